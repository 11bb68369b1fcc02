"""``deltakit route``: prompts through a router over a library, the choice and answer per prompt
against the same routing done through the Python API; access groups; one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

import deltakit as dk
from deltakit.cli import main
from deltakit.library import AdapterLibrary
from deltakit.train.generate import generate
from tests.cli.test_generate_cli import lm_dir  # noqa: F401  (a tiny Llama with a chat tokenizer, on disk)
from tests.train.test_instruct import tok  # noqa: F401

PROMPTS = ["hi there", "what is two plus four"]


@pytest.fixture(scope="module")
def library(lm_dir, tmp_path_factory):  # noqa: F811
    """A library of two random LoRAs on the tiny Llama: 'pub' (no groups: public), 'med' (group med)."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(lm_dir)
    root = tmp_path_factory.mktemp("route") / "lib"
    lib = AdapterLibrary(root)
    for i, (name, targets, groups) in enumerate((("pub", ("q_proj", "v_proj"), []),
                                                 ("med", ("v_proj", "o_proj"), ["med"]))):
        ad = dk.attach(model, dk.LoraConfig(r=2 + 2 * i, targets=targets), name=name)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        d = root.parent / name
        dk.save_adapter(ad, d)
        dk.detach(model, name)
        lib.add(d, model=model, name=name, description=f"the {name} adapter", groups=groups)
    return root


def _run(capsys, *argv):
    code = main(["route", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json_rows(out: str) -> list[dict]:
    return [json.loads(x) for x in out.splitlines()]


def _api_arrow(lm_dir, root, refs, prompts, top_k=1):  # noqa: F811
    from transformers import AutoTokenizer, LlamaForCausalLM

    from deltakit.route.arrow import Arrow
    model = LlamaForCausalLM.from_pretrained(lm_dir).eval()
    t = AutoTokenizer.from_pretrained(lm_dir)
    router = Arrow.from_library(AdapterLibrary(root), refs, model, top_k=top_k)
    outs = []
    for p in prompts:
        with router.scope(model, {}):
            outs.append(generate(model, t, [p], max_new_tokens=4, batch_size=1)[0])
    return outs


def test_arrow_prints_each_prompts_adapters_and_the_api_answer(lm_dir, library, capsys):  # noqa: F811
    code, out, err = _run(capsys, "--library", str(library), "--router", "arrow", "--top-k", "2",
                          "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "4", "--json")
    assert code == 0, err
    rows = _json_rows(out)
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert set(r["weights"]) <= {"pub", "med"} and sum(r["weights"].values()) == pytest.approx(1.0, abs=1e-3)
    assert [r["answer"] for r in rows] == _api_arrow(lm_dir, library, ["pub", "med"], PROMPTS, top_k=2)


def test_one_adapter_gets_all_the_weight_and_answers_like_it_alone(lm_dir, library, capsys):  # noqa: F811
    from transformers import AutoTokenizer, LlamaForCausalLM
    code, out, _ = _run(capsys, "--library", str(library), "--router", "arrow", "--adapter", "med",
                        "--prompt", PROMPTS[1], "--max-new-tokens", "4", "--json", "--per-token")
    assert code == 0
    (row,) = _json_rows(out)
    assert row["weights"] == {"med": 1.0} and {a for _, a in row["tokens"]} == {"med"}
    model = LlamaForCausalLM.from_pretrained(lm_dir).eval()
    AdapterLibrary(library).load(model, "med")
    assert row["answer"] == generate(model, AutoTokenizer.from_pretrained(lm_dir), [PROMPTS[1]], max_new_tokens=4)[0]


def test_retrieval_never_uses_an_adapter_the_caller_has_no_group_for(library, capsys):
    code, out, _ = _run(capsys, "--library", str(library), "--router", "retrieval", "--prompt", "the med adapter",
                        "--max-new-tokens", "2", "--json")
    assert code == 0 and _json_rows(out)[0]["weights"] == {"pub": 1.0}
    code, out, _ = _run(capsys, "--library", str(library), "--router", "retrieval", "--group", "med",
                        "--prompt", "the med adapter", "--max-new-tokens", "2", "--json")
    assert code == 0 and set(_json_rows(out)[0]["weights"]) <= {"pub", "med"}


def test_text_output_names_adapters_and_runs_of_tokens(library, capsys):
    code, out, _ = _run(capsys, "--library", str(library), "--router", "arrow", "--prompt", PROMPTS[0],
                        "--max-new-tokens", "2", "--per-token")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("[0] adapters: ") and lines[1].startswith("    answer: ")
    assert lines[2].startswith("    tokens: ") and "->" in lines[2]


def test_errors_are_one_line_with_a_non_zero_exit(library, tmp_path, capsys):
    lib = str(library)
    for argv, msg in ((["--library", str(tmp_path / "none"), "--router", "arrow", "--prompt", "x"],
                       "expected a library (library.sqlite)"),
                      (["--library", lib, "--router", "arrow"], "expected at least one --prompt"),
                      (["--library", lib, "--router", "arrow", "--adapter", "zzz", "--prompt", "x"],
                       "no library entry 'zzz'"),
                      (["--library", lib, "--router", "poly", "--prompt", "x"], "expected --routing FILE and --task"),
                      (["--library", lib, "--router", "arrow", "--top-k", "0", "--prompt", "x"], "--top-k")):
        code, out, err = _run(capsys, *argv)
        assert code == 1 and out == "" and err.count("\n") == 1 and msg in err, (argv, err)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["route", "--help"])
    assert e.value.code == 0 and "usage: deltakit route" in capsys.readouterr().out


def test_mbc_routes_among_the_cluster_adapters_library_cluster_made(library, tmp_path, capsys):
    import shutil
    root = tmp_path / "lib"
    shutil.copytree(library, root)
    assert main(["library", "--root", str(root), "cluster", "--clusters", "1"]) == 0
    capsys.readouterr()
    code, out, err = _run(capsys, "--library", str(root), "--router", "mbc", "--prompt", PROMPTS[0],
                          "--max-new-tokens", "2", "--json")
    assert code == 0, err
    (row,) = _json_rows(out)
    assert list(row["weights"]) == [e.name for e in AdapterLibrary(root).list(tag="mbc")] and \
        row["weights"][next(iter(row["weights"]))] == 1.0


def test_lorahub_fits_weights_on_examples_and_answers_with_the_composition(library, tmp_path, capsys):
    f = tmp_path / "ex.jsonl"
    f.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                           for q, a in (("hi there", "four"), ("what is two plus four", "six"))) + "\n")
    code, out, err = _run(capsys, "--library", str(library), "--router", "lorahub", "--examples", str(f),
                          "--iterations", "4", "--prompt", PROMPTS[0], "--max-new-tokens", "2", "--json", "--mix")
    assert code == 0, err
    (row,) = _json_rows(out)
    assert set(row["weights"]) <= {"pub", "med"} and "lorahub (mix)" in err
    code, _, err = _run(capsys, "--library", str(library), "--router", "lorahub", "--examples", str(f),
                        "--iterations", "2", "--prompt", PROMPTS[0])
    assert code == 1 and "expected one rank and scale" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "--library", str(library), "--router", "lorahub", "--prompt", "x")
    assert code == 1 and "expected --examples" in err and err.count("\n") == 1
