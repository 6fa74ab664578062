"""`asa-export calibrate`: the command line over asa_export.router.calibrate."""

import json

import pytest

import graphs
from asa_export.cli import calibrate as cli_calibrate
from asa_export.cli.main import build_parser, main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("cli_calibrate")
    text = "\n\n".join(topics[k] for k in sorted(topics))[:30000]
    (root / "text.txt").write_text(text)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=256,
                                                              special_tokens=["[UNK]"]))
    # A folder holding only tokenizer.json is a valid --tokenizer too.
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    return str(graphs.export("llama", "dynamo", attn="sdpa")), root


def test_calibrate_command_writes_model_report_and_table(inputs, capsys):
    model, root = inputs
    status = main(["calibrate", model, "--text", str(root / "text.txt"), "--tokenizer",
                   str(root / "tok"), "--out", str(root / "m.asa.onnx"), "--context", "256",
                   "--windows", "2", "--target-density", "0.95", "--local-blocks", "1",
                   "--retrieval-heads", "2", "--report", str(root / "r.json"), "-q"])
    out = capsys.readouterr().out
    assert status == 0
    report = json.loads((root / "r.json").read_text())
    heads = report["retrieval"]["heads"]
    assert len(heads) == 2 and report["settings"]["retrieval_heads"] == 2
    assert "retrieval heads at tau 1 (2, layer:head): " + " ".join(f"{a}:{b}" for a, b in heads) in out
    for layer, head in heads:
        assert report["sites"][layer]["thresholds"][head] == 1.0
    assert report["settings"]["mode"] == "density" and report["settings"]["context"] == 256
    # The density target holds for the fitted thresholds; the retrieval heads come on top.
    assert report["retrieval"]["fitted"]["density"] <= 0.95
    assert report["totals"]["density"] >= report["retrieval"]["fitted"]["density"]
    assert all(s["attributes"]["local_blocks"] == 1 for s in report["sites"])
    assert "asa_attention_0" in out and "total: density" in out
    assert (root / "m.asa.onnx").is_file()


def test_bad_input_exits_1_with_the_message(inputs, capsys, tmp_path):
    model, root = inputs
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    status = main(["calibrate", model, "--text", str(empty), "--tokenizer", str(root / "tok"),
                   "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert status == 1 and "asa-export: error:" in err and "is empty" in err
    assert "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_targets_are_mutually_exclusive(inputs, capsys):
    model, root = inputs
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", model, "--text", "t", "--tokenizer", "t", "--out", "o.onnx",
              "--threshold", "0.9", "--target-recall", "0.9"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_every_option_maps_to_calibrate_options():
    args = build_parser().parse_args(
        ["calibrate", "m.onnx", "--text", "a", "b", "--tokenizer", "t", "--out", "o.onnx",
         "--threshold", "0.9", "--gate", "--context", "128", "--windows", "3", "--seed", "5",
         "--block-size", "128", "--sink-blocks", "2", "--local-blocks", "3",
         "--select-per", "group", "--gate-dim", "16", "--gate-steps", "7", "--device", "cpu",
         "--retrieval-heads", "20", "--retrieval-context", "4096",
         "--layer-recall", "0-2,5=0.9", "--layer-recall", "7=0.8"])
    opts = cli_calibrate.options_from(args)
    assert (opts.threshold, opts.gate, opts.context, opts.windows, opts.seed) == (0.9, True, 128, 3, 5)
    assert (opts.rewrite.block_size, opts.rewrite.sink_blocks, opts.rewrite.local_blocks,
            opts.rewrite.select_per) == (128, 2, 3, 1)
    assert (opts.gate_dim, opts.gate_steps, opts.device) == (16, 7, "cpu")
    assert (opts.retrieval_heads, opts.retrieval_context, opts.prompt_context()) == (20, 4096, 4096)
    assert opts.layer_recall == ((0, 0.9), (1, 0.9), (2, 0.9), (5, 0.9), (7, 0.8))
    default = build_parser().parse_args(["calibrate", "m.onnx", "--text", "a", "--tokenizer", "t",
                                         "--out", "o.onnx"])
    opts = cli_calibrate.options_from(default)
    assert (opts.retrieval_heads, opts.retrieval_context, opts.prompt_context()) == (0, None, 2048)
    assert opts.layer_recall == ()
    assert args.text == ["a", "b"]


@pytest.mark.parametrize("spec, message", [("0-2", "wants LAYERS=R"), ("a=0.9", "wants LAYERS=R"),
                                           ("1=x", "wants LAYERS=R"), ("=0.9", "wants LAYERS=R")])
def test_malformed_layer_recall_exits_1(inputs, capsys, tmp_path, spec, message):
    model, root = inputs
    status = main(["calibrate", model, "--text", str(root / "text.txt"), "--tokenizer",
                   str(root / "tok"), "--out", str(tmp_path / "m.onnx"), "--layer-recall", spec])
    err = capsys.readouterr().err
    assert status == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_layer_named_twice_is_refused():
    from asa_export.errors import AsaExportError

    with pytest.raises(AsaExportError, match="layer 3 twice"):
        cli_calibrate.parse_layer_recall(["1-3=0.9", "3=0.8"])


@pytest.mark.parametrize("count, message", [("-3", "retrieval heads must be >= 0"),
                                            ("1000", "more than the model's 16 query heads")])
def test_bad_retrieval_head_counts_exit_1(inputs, capsys, tmp_path, count, message):
    model, root = inputs
    status = main(["calibrate", model, "--text", str(root / "text.txt"), "--tokenizer",
                   str(root / "tok"), "--out", str(tmp_path / "m.onnx"), "--context", "256",
                   "--retrieval-heads", count])
    err = capsys.readouterr().err
    assert status == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()
