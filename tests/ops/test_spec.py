import pytest

from logitcast.ops import InvalidSpecError, TargetSpec


def test_canonical_dict_round_trips_and_keeps_only_fields_the_method_reads():
    spec = TargetSpec(method="top_p_k", k=50, p=0.9, temperature=2.0, seed=5)
    d = spec.to_dict()
    assert d == {"method": "top_p_k", "k": 50, "p": 0.9, "temperature": 2.0, "seed": 5}
    assert TargetSpec.from_dict(d) == spec
    assert TargetSpec.from_dict(TargetSpec(draws=40, unique=None).to_dict()).draws == 40


def test_key_is_stable_and_differs_between_specs():
    assert TargetSpec().key() == TargetSpec().key()
    assert TargetSpec(seed=1).key() != TargetSpec(seed=2).key()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "nope"}, "method"),
        ({"method": "topk", "k": 0}, "k"),
        ({"method": "top_p_k", "p": 0.0}, "p"),
        ({"method": "top_p_k", "p": 1.5}, "p"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1e-39}, "temperature"),  # x / 1e-39 overflows float32 logits
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1e3}, "temperature"),
        ({"draws": 10, "unique": 12.0}, "draws or unique"),
        ({"draws": None, "unique": None}, "draws or unique"),
        ({"unique": 500.0}, "unique"),
        ({"draws": 0, "unique": None}, "draws"),
        ({"proposal_t": 0.0}, "proposal_t"),
        ({"proposal_t": 2e-174}, "proposal_t"),
        ({"method": "head_tail", "k_head": 0}, "k_head"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_specs_raise_naming_the_field(kwargs, field):
    with pytest.raises(InvalidSpecError, match=field):
        TargetSpec(**kwargs)


def test_from_dict_rejects_unknown_and_unread_fields():
    with pytest.raises(InvalidSpecError, match="unknown spec field"):
        TargetSpec.from_dict({"method": "topk", "kk": 3})
    with pytest.raises(InvalidSpecError, match="does not read"):
        TargetSpec.from_dict({"method": "topk", "k": 3, "draws": 5})
