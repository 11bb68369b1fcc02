"""The demo pipeline end to end on a tiny model (the real one runs in `make demo`)."""
import json

from deltakit.demo import DemoConfig, run


def test_demo_pipeline_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    cfg = DemoConfig(model=str(tiny_model_dir), out=str(tmp_path / "demo"), n_train=96, n_dev=48,
                     steps=6, batch_size=8, max_length=32)
    rows = run(cfg)
    assert [r["task"] for r in rows] == list(cfg.tasks)
    for r in rows:
        for key in ("base_acc", "lora_acc", "linear_acc", "task_arithmetic_acc", "ties_acc"):
            assert 0.0 <= r[key] <= 1.0
        assert (tmp_path / "demo" / "adapters" / r["task"] / "adapter.safetensors").is_file()
        man = json.loads((tmp_path / "demo" / "adapters" / r["task"] / "adapter.json").read_text())
        # saved while still trainable (it used to record 0 trainable: frozen before saving)
        assert man["parameters"]["trainable"] == man["parameters"]["total"] == r["adapter_params"] > 0
        assert man["training"]["steps"] == 6
        assert round(man["training"]["metrics"]["eval_accuracy"], 4) == r["lora_acc"]
        assert [d["rows"] for d in man["training"]["data"]] == [96, 48]
        # the compressed adapter, scored attached from its file (smaller than the adapter on MiniLM,
        # 4.7x; on this tiny model the fp16 group scales and the manifest outweigh 4-bit codes)
        files = [f for f in (tmp_path / "demo" / "compressed" / r["task"]).rglob("*") if f.is_file()]
        assert r["compressed_bytes"] == sum(f.stat().st_size for f in files) > 0
        assert 0.0 <= r["compressed_acc"] <= 1.0
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["mixed_batch"]["max_abs_diff"] < 1e-5
    out = capsys.readouterr().out
    assert "ties_acc" in out and "mixed - per-adapter" in out and "compressed_acc" in out
    # the routing step: the three adapters in a library, 32 rows of each task routed with Arrow
    routing = saved["routing"]
    assert routing["rows"] == 96 and set(routing["confusion"]) == set(cfg.tasks)
    assert all(sum(c.values()) == 32 for c in routing["confusion"].values())
    assert all(0.0 <= routing[k][t] <= 1.0 for k in ("arrow_acc", "oracle_acc") for t in cfg.tasks)
    from deltakit.library import AdapterLibrary
    assert sorted(e.name for e in AdapterLibrary(tmp_path / "demo" / "library").list()) == sorted(cfg.tasks)
    assert "Arrow routing" in out
