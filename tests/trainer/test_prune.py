import json
from dataclasses import replace

import pytest
import torch

from logitcast.cli.main import main
from logitcast.trainer.prune import (
    MANIFEST,
    PruneError,
    PruneSpec,
    calibration_rows,
    measure_importance,
    plan_pruning,
    prune,
    prune_model,
    write_pruned,
)
from tests.data.conftest import write_corpus

VOCAB = 1024


def tiny(family="Llama", *, tie=False, layers=4, heads=4, kv_heads=2, hidden=64, seed=0):
    """A seeded random model of `family` (head_dim 16)."""
    import transformers

    config_cls = getattr(transformers, f"{family}Config")
    extra = {"attention_bias": True} if family == "Llama" else {}
    config = config_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, head_dim=16, tie_word_embeddings=tie,
                        max_position_embeddings=256, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, f"{family}ForCausalLM")(config)
        for name, p in model.named_parameters():  # random norms and biases, so slicing shows
            if "norm" in name or name.endswith("bias"):
                torch.nn.init.normal_(p, 1.0 if "norm" in name else 0.0, 0.1)
    return model.eval()


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB tokens (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", eos_token="w1")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("cal") / "tokens", vocab=VOCAB)
    return calibration_rows(corpus, 8, 64)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """The tiny_random serving teacher (4 layers) saved with a tokenizer, and a corpus of it."""
    from logitcast.server.backends import TransformersBackend
    from logitcast.server.embedded import tokenizer_fingerprint

    root = tmp_path_factory.mktemp("teacher")
    model = TransformersBackend.tiny_random(vocab_size=VOCAB, hidden=64, layers=4).model
    model.save_pretrained(root / "model")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "model")
    write_corpus(root / "tokens", vocab=VOCAB, fingerprint=tokenizer_fingerprint(tokenizer))
    write_corpus(root / "other-tokens", vocab=VOCAB, fingerprint="another tokenizer")
    return root


def logits(model, tokens):
    with torch.inference_mode():
        return model(input_ids=tokens).logits


# ---------------------------------------------------------------------------- the model


def test_a_pruned_directory_loads_as_a_student_with_the_teachers_vocabulary(tmp_path,
                                                                             calibration):
    from transformers import AutoModelForCausalLM

    from logitcast.trainer.students import build_student

    teacher = tiny()
    pruned = prune(teacher, PruneSpec(layers=2, hidden=48, ffn=64), calibration)
    out = write_pruned(pruned.model, tiny_tokenizer(), tmp_path / "student",
                       pruned.manifest(teacher="tiny"))
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != "student"]  # no partial left over
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.get_output_embeddings().weight.shape == (VOCAB, 48)
    assert (loaded.config.num_hidden_layers, loaded.config.intermediate_size) == (2, 64)
    torch.testing.assert_close(logits(loaded, calibration), logits(pruned.model, calibration))
    student = build_student(path=str(out), vocab_size=VOCAB)  # what student.path does
    assert student.config.hidden_size == 48
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kept_layers"] == pruned.plan.layers
    assert len(manifest["block_importance"]) == 4
    assert manifest["sizes"] == {"layers": 2, "hidden": 48, "ffn": 64, "heads": 4, "kv_heads": 2}


@pytest.mark.parametrize(("family", "tie"), [("Llama", False), ("Llama", True), ("Mistral", False),
                                        ("Qwen2", False), ("Qwen3", True)])
def test_keeping_everything_reproduces_the_teacher_logits_exactly(family, tie, calibration):
    teacher = tiny(family, tie=tie)
    pruned = prune(teacher, PruneSpec(layers=4), calibration)
    assert pruned.plan.layers == [0, 1, 2, 3]
    assert type(pruned.model) is type(teacher)
    assert torch.equal(logits(pruned.model, calibration), logits(teacher, calibration))


def test_depth_keeps_the_blocks_that_change_the_residual_most_in_order(calibration):
    teacher = tiny(layers=6)
    with torch.no_grad():
        for i in (1, 2, 4):  # blocks that add nothing to the residual stream
            teacher.model.layers[i].self_attn.o_proj.weight.zero_()
            teacher.model.layers[i].self_attn.o_proj.bias.zero_()
            teacher.model.layers[i].mlp.down_proj.weight.zero_()
        teacher.model.norm.weight.fill_(1.0)  # so the normed last hidden state keeps its direction
    with torch.inference_mode():
        hs = teacher(input_ids=calibration, output_hidden_states=True).hidden_states
    independent = torch.stack([1 - torch.nn.functional.cosine_similarity(
        hs[i].double(), hs[i + 1].double(), dim=-1).mean() for i in range(6)])
    importance = measure_importance(teacher, calibration)
    torch.testing.assert_close(importance.blocks, independent)
    assert importance.blocks[[1, 2, 4]].abs().max() < 1e-12 < importance.blocks[[0, 3, 5]].min()
    pruned = prune(teacher, PruneSpec(layers=3), calibration)
    assert pruned.plan.layers == [0, 3, 5]
    assert torch.equal(logits(pruned.model, calibration), logits(teacher, calibration))


@pytest.mark.parametrize(("family", "tie"), [("Llama", True), ("Qwen2", False)])
def test_width_slices_channels_neurons_and_whole_gqa_groups(family, tie, calibration):
    teacher = tiny(family, tie=tie, heads=8, kv_heads=2, layers=2)  # groups of 4 query heads
    hd, t = 16, teacher.model.layers
    one_group = prune(teacher, PruneSpec(layers=2, hidden=40, ffn=96, kv_heads=1), calibration)
    two_each = prune(teacher, PruneSpec(layers=2, hidden=40, ffn=96, heads=4), calibration)
    assert one_group.spec.heads == 4
    assert two_each.spec.kv_heads == 2
    for pruned, per_group in ((one_group, 4), (two_each, 2)):
        model, plan = pruned.model, pruned.plan
        assert model.get_input_embeddings().weight.shape == (VOCAB, 40)
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
        assert model.model.norm.weight.shape == (40,)
        c = plan.channels
        for j, block in enumerate(model.model.layers):
            kv, heads = plan.kv_heads[j], plan.heads[j]
            assert [h // 4 for h in heads.tolist()] == [g for g in kv.tolist()
                                                        for _ in range(per_group)]
            if per_group == 4:
                assert heads.tolist() == list(range(4 * kv.item(), 4 * kv.item() + 4))
            q_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
            kv_rows = (kv[:, None] * hd + torch.arange(hd)).flatten()
            a, src = block.self_attn, t[j].self_attn
            assert a.q_proj.weight.shape == (len(heads) * hd, 40)
            assert a.k_proj.weight.shape == a.v_proj.weight.shape == (len(kv) * hd, 40)
            assert torch.equal(a.q_proj.weight, src.q_proj.weight[q_rows][:, c])
            assert torch.equal(a.v_proj.weight, src.v_proj.weight[kv_rows][:, c])
            assert torch.equal(a.o_proj.weight, src.o_proj.weight[c][:, q_rows])
            assert torch.equal(a.k_proj.bias, src.k_proj.bias[kv_rows])
            assert torch.equal(block.mlp.down_proj.weight,
                               t[j].mlp.down_proj.weight[c][:, plan.neurons[j]])
            assert torch.equal(block.input_layernorm.weight, t[j].input_layernorm.weight[c])
        assert logits(model, calibration).shape == (8, 64, VOCAB)


def test_width_keeps_the_most_active_ffn_neurons(calibration):
    teacher = tiny(layers=1)
    with torch.no_grad():
        teacher.model.layers[0].mlp.up_proj.weight[[5, 77]] *= 50  # two loud neurons
    importance = measure_importance(teacher, calibration)
    assert set(torch.topk(importance.neurons[0], 2).indices.tolist()) == {5, 77}
    pruned = prune(teacher, PruneSpec(layers=1, ffn=8), calibration)
    assert {5, 77} <= set(pruned.plan.neurons[0].tolist())


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("flags", "says"), [
    (["--layers", "0"], "layers must be a positive integer"),
    (["--layers", "5"], "layers 5 exceeds the teacher's 4"),
    (["--layers", "2", "--hidden", "128"], "hidden 128 exceeds the teacher's 64"),
    (["--layers", "2", "--heads", "3"], "heads 3 is not a multiple of kv_heads 2"),
    (["--layers", "2", "--heads", "4", "--kv-heads", "1"], "4 query heads per kv head exceeds"),
    (["--layers", "2", "--hidden", "50"], "LlamaConfig refuses the pruned shape"),
    (["--layers", "2", "--calibration-rows", "1000"], "rows of 64 tokens, 1000 asked for"),
    (["--layers", "2", "--calibration", "{root}/missing"], "not a token shard directory"),
    (["--layers", "2", "--calibration", "{root}/other-tokens"], "was tokenized with tokenizer"),
    (["--layers", "2", "--teacher", "{root}/tokens"], "not 'default' nor an HF model directory"),
    (["--layers", "2", "--out", "{root}/model", "--force"], "is the teacher's own directory"),
])
def test_bad_input_is_refused_clearly_and_writes_nothing(teacher_dir, tmp_path, capsys,
                                                        flags, says):
    base = {"--teacher": f"{teacher_dir}/model", "--calibration": f"{teacher_dir}/tokens",
            "--calibration-len": "64", "--out": str(tmp_path / "out")}
    given = {f for f in flags if f.startswith("--")}
    argv = [a for k, v in base.items() if k not in given for a in (k, v)]
    assert main(["prune", *argv, *[f.format(root=teacher_dir) for f in flags]]) == 2
    assert says in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_an_unsupported_teacher_class_is_named(calibration):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(PruneError, match="cannot prune a GPT2LMHeadModel; supported teachers: "
                                         "LlamaForCausalLM"):
        prune(gpt2, PruneSpec(layers=1), calibration)


# ---------------------------------------------------------------------------- the CLI


def test_cli_prunes_a_model_directory_end_to_end(teacher_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student"
    argv = ["prune", "--teacher", str(teacher_dir / "model"), "--layers", "3", "--hidden", "48",
            "--ffn", "96", "--kv-heads", "1", "--calibration", str(teacher_dir / "tokens"),
            "--calibration-rows", "4", "--calibration-len", "64", "--out", str(out)]
    assert main(argv) == 0
    assert "blocks [" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.hidden_size,
            model.config.num_attention_heads, model.config.num_key_value_heads,
            model.config.head_dim) == (3, 48, 2, 1, 16)
    assert len(AutoTokenizer.from_pretrained(out)) == VOCAB
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["teacher"] == str((teacher_dir / "model").resolve())
    assert manifest["calibration"]["rows"] == 4
    assert len(manifest["kept_layers"]) == 3
    assert main(argv) == 2
    assert "pass --force" in capsys.readouterr().out
    assert main([*argv[:4], "2", *argv[5:], "--force"]) == 0
    assert json.loads((out / MANIFEST).read_text())["sizes"]["layers"] == 2


# ---------------------------------------------------------------------------- the real teacher


@pytest.mark.slow
def test_pruned_smollm2_starts_far_better_than_random_or_evenly_spaced_blocks(tmp_path):
    from logitcast.data.corpus import stdlib_documents
    from logitcast.data.shards import ShardWriter, TokenCorpus
    from logitcast.server.embedded import load_embedded_teacher, tokenizer_fingerprint

    teacher, tok = load_embedded_teacher(dtype=torch.float32)
    docs = list(stdlib_documents(max_chars=60_000))
    rows = {}
    for name, part, seed in (("cal", docs[::2], 0), ("heldout", docs[1::2], 1)):
        writer = ShardWriter(tmp_path / name, tokenizer_fingerprint(tok), 49152, tok.eos_token_id)
        for i, text in enumerate(part):
            writer.add(tok(text)["input_ids"])
            writer.commit_source(str(i))
        writer.flush()
        rows[name] = calibration_rows(TokenCorpus(tmp_path / name), 4, 128, seed=seed)

    def loss(model):
        with torch.inference_mode():
            return model(input_ids=rows["heldout"], labels=rows["heldout"]).loss.item()

    importance = measure_importance(teacher, rows["cal"])
    plans = {n: plan_pruning(importance, teacher.config, PruneSpec(layers=n).against(teacher.config))
             for n in (6, 20)}
    for n, plan in plans.items():
        assert plan.layers == sorted(torch.topk(importance.blocks, n).indices.tolist())
        assert {0, 1, 29} <= set(plan.layers)  # the first two blocks and the last matter most
    # full width: every block's neurons and heads are all of them, so any 6 blocks fit plans[6]
    evenly = replace(plans[6], layers=[0, 6, 12, 17, 23, 29])
    students = {name: prune_model(teacher, plan, PruneSpec(layers=len(plan.layers)).against(
        teacher.config)) for name, plan in (("6", plans[6]), ("6-even", evenly),
                                            ("20", plans[20]))}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        students["20-random"] = type(students["20"])(students["20"].config)
    got = {name: round(loss(model), 3) for name, model in students.items()}
    print(f"held-out loss {got}; 6 kept {plans[6].layers}, 20 kept {plans[20].layers}")
    assert got["6"] < got["6-even"] - 2.0
    assert got["20"] < 0.7 * got["20-random"]
