"""AdapterLibrary on real tiny models and real adapters: add / list / get / load / remove /
verify, content addressing, the routing data against dense references, refusal of a foreign
base, concurrent writers and crashes mid-add."""
from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest
import torch

import deltakit as dk
from deltakit.core.layer import DeltaLayer
from deltakit.io.files import sha256_file
from deltakit.library import AdapterLibrary, LibraryError, layer_sketch, projection, prototype
from deltakit.library._index import Index
from deltakit.taskvec import LowRank
from tests.conftest import make_input, make_model, run

from ._helpers import adapter_dir, add_worker, crashing_add, lora_dir, mlp

ATTN = ["q_proj", "v_proj"]


@pytest.fixture
def model():
    return make_model("llama")


@pytest.fixture
def lib(tmp_path):
    return AdapterLibrary(tmp_path / "lib")


def _files(lib):
    return sorted(p.name for p in lib.root.joinpath("objects").iterdir()), \
        sorted(p.name for p in lib.root.joinpath("routing").iterdir())


def _dense_dw(model, adapter_dir):
    """{module path: dW} from the method's own dense path (layer.weight_delta), independent of
    the library's factor maths."""
    adapter = dk.load_adapter(model, adapter_dir, name="ref")
    out = {}
    for path, layer in adapter.layers():
        assert isinstance(layer, DeltaLayer)
        out[path] = layer.weight_delta(["ref"])["weight"].detach().double()
    dk.detach(model, "ref")
    return out


# ----------------------------------------------------------------------------- add / list / get
def test_add_records_metadata_and_lists_with_filters(tmp_path, lib, model):
    a = lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1)
    b = lora_dir(tmp_path / "b", model, r=4, targets=["o_proj"], seed=2)
    ea = lib.add(a, model=model, name="sst2", task="sentiment", description="movie reviews",
                 tags=["nlp", "cls"], groups=["team-a"])
    eb = lib.add(b, model=model, name="cola", task="grammar", tags=["nlp"], groups=["team-b", "team-a"])
    man = dk.io.adapter_files.read_manifest(a)
    assert (ea.ref, ea.method, ea.task, ea.description) == ("sst2@1", "lora", "sentiment", "movie reviews")
    assert ea.sha256 == man["tensors"]["sha256"] == sha256_file(a / "adapter.safetensors")
    assert ea.size == (a / "adapter.safetensors").stat().st_size
    assert ea.base_fingerprint == man["base_fingerprint"] == lib.base_fingerprint
    assert (ea.tags, ea.groups, eb.groups) == (("cls", "nlp"), ("team-a",), ("team-a", "team-b"))
    refs = lambda **kw: [e.ref for e in lib.list(**kw)]  # noqa: E731
    assert refs() == ["cola@1", "sst2@1"]
    assert refs(tag="nlp") == ["cola@1", "sst2@1"] and refs(tag="cls") == ["sst2@1"]
    assert refs(group="team-b") == ["cola@1"] and refs(group="team-a") == ["cola@1", "sst2@1"]
    assert refs(task="grammar") == ["cola@1"] and refs(name="sst2") == ["sst2@1"]
    assert refs(method="lora") == ["cola@1", "sst2@1"] and refs(method="ia3") == []
    assert dk.adapters(model) == {}  # the model is left as it was


def test_get_and_load_give_the_same_outputs_as_the_source_directory(tmp_path, lib, model):
    a = lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1)
    lib.add(a, model=model, name="sst2")
    e = lib.get("sst2")
    assert e.path.is_dir() and sha256_file(e.path / "adapter.safetensors") == e.sha256
    x = make_input("llama")
    ref_model, lib_model = make_model("llama"), make_model("llama")
    dk.load_adapter(ref_model, a)
    adapter = lib.load(lib_model, "sst2@1")
    assert adapter.name == "sst2"
    assert torch.equal(run(ref_model, x), run(lib_model, x))
    assert not torch.equal(run(ref_model, x), run(make_model("llama"), x))  # the adapter does something


def test_versions_auto_increment_and_duplicates_are_refused(tmp_path, lib, model):
    a = lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1)
    b = lora_dir(tmp_path / "b", model, r=2, targets=ATTN, seed=2)
    assert lib.add(a, model=model, name="x").ref == "x@1"
    assert lib.add(b, model=model, name="x").ref == "x@2"
    assert lib.add(a, model=model, name="x", version=7).ref == "x@7"
    assert lib.add(b, model=model, name="x").ref == "x@8"
    with pytest.raises(LibraryError, match="x@7 is already in the library"):
        lib.add(b, model=model, name="x", version=7)
    assert lib.get("x").version == 8 and lib.get("x@2").sha256 != lib.get("x@1").sha256
    with pytest.raises(LibraryError, match=r"no library entry 'x@3' \(versions: \[1, 2, 7, 8\]\)"):
        lib.get("x@3")
    with pytest.raises(LibraryError, match="expected NAME or NAME@VERSION"):
        lib.get("x@latest")
    with pytest.raises(LibraryError, match="expected a non-empty name without '@'"):
        lib.add(a, model=model, name="x@9")
    assert lib.verify().ok


def test_the_same_adapter_is_stored_once(tmp_path, lib, model):
    a = lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1)
    e1 = lib.add(a, model=model, name="one")
    e2 = lib.add(a, model=model, name="two", tags=["copy"])
    assert (e1.sha256, e1.routing_sha256) == (e2.sha256, e2.routing_sha256) and e1.path == e2.path
    assert _files(lib) == ([e1.sha256], [f"{e1.routing_sha256}.safetensors"])
    assert sha256_file(e1.routing_path) == e1.routing_sha256  # routing files are content-addressed too


def test_same_tensors_with_another_config_are_refused(tmp_path, lib, model):
    a = lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1, alpha=16.0)
    b = lora_dir(tmp_path / "b", model, r=2, targets=ATTN, seed=1, alpha=4.0)  # same tensors, other scale
    assert sha256_file(a / "adapter.safetensors") == sha256_file(b / "adapter.safetensors")
    lib.add(a, model=model, name="a")
    with pytest.raises(LibraryError, match="already stored as a@1 with a different method, config or targets"):
        lib.add(b, model=model, name="b")
    assert [e.ref for e in lib.list()] == ["a@1"] and lib.verify().ok


def test_add_from_a_peft_directory(tmp_path, lib, model):
    from deltakit.io.peft import export_peft

    a = lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1)
    adapter = dk.load_adapter(model, a, name="p")
    export_peft(adapter, tmp_path / "peft-a")
    dk.detach(model, "p")
    e = lib.add(tmp_path / "peft-a", model=model, task="t")
    assert (e.name, e.method) == ("peft-a", "lora") and dk.adapters(model) == {}
    native = AdapterLibrary(tmp_path / "lib2")
    native.add(a, model=model, name="native")
    got, want = lib.routing("peft-a"), native.routing("native")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    x = make_input("llama")
    m1, m2 = make_model("llama"), make_model("llama")
    lib.load(m1, "peft-a")
    dk.load_adapter(m2, a)
    torch.testing.assert_close(run(m1, x), run(m2, x))


def test_lineage_records_parents(tmp_path, lib, model):
    a = lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1)
    b = lora_dir(tmp_path / "b", model, r=2, targets=ATTN, seed=2)
    c = lora_dir(tmp_path / "c", model, r=4, targets=ATTN, seed=3)
    ea, eb = lib.add(a, model=model, name="a"), lib.add(b, model=model, name="b")
    ec = lib.add(c, model=model, name="ab", lineage=[("a@1", "merge"), (eb.id, "merge")])
    assert ec.lineage == ((ea.id, "merge"), (eb.id, "merge"))
    with pytest.raises(LibraryError, match="expected an existing entry id as parent, found 99"):
        lib.add(c, model=model, name="bad", lineage=[(99, "merge")])
    assert [e.ref for e in lib.list()] == ["a@1", "ab@1", "b@1"] and lib.verify().ok


# ----------------------------------------------------------------------------- base
def test_an_adapter_for_another_base_is_refused(tmp_path, lib, model):
    lib.add(lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1), model=model, name="a")
    other = make_model("llama", seed=1)
    foreign = lora_dir(tmp_path / "f", other, r=2, targets=ATTN, seed=2)
    with pytest.raises(LibraryError, match="the model given for it is not this library's base") as e1:
        lib.add(foreign, model=other, name="f")  # consistent with its own base, but not the library's
    with pytest.raises(LibraryError, match="the adapter was trained on another base than the model given") as e2:
        lib.add(foreign, model=model, name="f")
    assert "\n" not in str(e1.value) and "\n" not in str(e2.value)
    assert [e.ref for e in lib.list()] == ["a@1"]
    report = lib.verify()
    assert report.ok and report.checked == 1 and not report.orphans


# ----------------------------------------------------------------------------- routing data
def test_prototype_of_hand_worked_factors():
    # dW = B @ A = [[3, 4], [0, 0]]: its top right-singular vector is (3, 4) / 5
    v = prototype(LowRank(torch.tensor([[1.0], [0.0]]), torch.tensor([[3.0, 4.0]])))
    torch.testing.assert_close(v, torch.tensor([0.6, 0.8]))
    # a negative scale flips the left vector only; the stored sign is canonical either way
    torch.testing.assert_close(prototype(LowRank(torch.tensor([[1.0], [0.0]]), torch.tensor([[-3.0, -4.0]]),
                                                 scale=-2.0)), torch.tensor([0.6, 0.8]))
    # rank 2: dW = diag(1, 5) (as B = I, A = diag(1, 5)): the top direction is e2
    torch.testing.assert_close(prototype(LowRank(torch.eye(2), torch.diag(torch.tensor([1.0, 5.0])))),
                               torch.tensor([0.0, 1.0]))
    assert torch.equal(prototype(LowRank(torch.zeros(3, 2), torch.ones(2, 4))), torch.zeros(4))


def test_prototypes_equal_the_dense_top_singular_vector_for_mixed_ranks_and_targets(tmp_path, lib, model):
    dirs = {"r1": lora_dir(tmp_path / "r1", model, r=1, targets=ATTN, seed=1),
            "r4": lora_dir(tmp_path / "r4", model, r=4, targets=["o_proj", "down_proj"], seed=2),
            "r8": lora_dir(tmp_path / "r8", model, r=8, targets=["q_proj", "up_proj"], seed=3)}
    for name, d in dirs.items():
        lib.add(d, model=model, name=name)
        routing = lib.routing(name)
        dense = _dense_dw(model, d)
        assert {k.removeprefix("prototype.") for k in routing if k != "embedding"} == set(dense)
        for path, dw in dense.items():
            _, _, Vh = torch.linalg.svd(dw)
            p = routing[f"prototype.{path}"]
            assert p.dtype == torch.float32 and p.shape == (dw.shape[1],)
            assert abs(float(p.double() @ Vh[0])) == pytest.approx(1.0, abs=1e-5), (name, path)


def test_other_methods_get_dense_prototypes_and_activation_adapters_an_embedding_only(tmp_path, lib, model):
    from deltakit.methods.bottleneck import HoulsbyConfig
    from deltakit.methods.ia3 import IA3Config

    ia3 = adapter_dir(tmp_path / "ia3", model, IA3Config(targets=["k_proj", "down_proj"]), seed=4)
    lib.add(ia3, model=model)
    routing, dense = lib.routing("ia3"), _dense_dw(model, ia3)
    assert set(dense) == {k.removeprefix("prototype.") for k in routing if k != "embedding"} and len(dense) == 4
    for path, dw in dense.items():
        _, _, Vh = torch.linalg.svd(dw)
        assert abs(float(routing[f"prototype.{path}"].double() @ Vh[0])) == pytest.approx(1.0, abs=1e-5)
    houlsby = adapter_dir(tmp_path / "houlsby", model, HoulsbyConfig(bottleneck_size=4), seed=5)
    e = lib.add(houlsby, model=model)
    assert e.method == "houlsby" and set(lib.routing("houlsby")) == {"embedding"}
    assert torch.equal(lib.routing("houlsby")["embedding"], torch.zeros(64))  # no weight delta to sketch
    assert lib.verify().ok


def test_embedding_is_the_seeded_projection_of_the_dense_deltas(tmp_path, lib, model):
    a = lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1)
    b = lora_dir(tmp_path / "b", model, r=6, targets=["v_proj", "gate_proj"], seed=2)
    for name, d in (("a", a), ("b", b)):
        lib.add(d, model=model, name=name)
        want = torch.zeros(64, dtype=torch.float64)
        for path, dw in _dense_dw(model, d).items():
            P, Q = projection(f"{path}.weight", *dw.shape)
            want += (P @ dw @ Q.T).reshape(-1)
        got = lib.routing(name)["embedding"]
        assert got.shape == (64,)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # linear in dW, and the same layer name always draws the same projection
    B, A = torch.randn(16, 3), torch.randn(3, 16)
    s1 = layer_sketch("m.weight", LowRank(B, A))
    torch.testing.assert_close(layer_sketch("m.weight", LowRank(2 * B, A)), 2 * s1)
    torch.testing.assert_close(layer_sketch("m.weight", B.double() @ A.double()), s1)


# ----------------------------------------------------------------------------- remove / verify
def test_remove_takes_entry_files_and_routing_data_and_verify_proves_the_rest(tmp_path, lib, model):
    a = lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1)
    b = lora_dir(tmp_path / "b", model, r=4, targets=["o_proj"], seed=2)
    ea = lib.add(a, model=model, name="a", tags=["t"], groups=["g"])
    ea2 = lib.add(a, model=model, name="a-copy")
    eb = lib.add(b, model=model, name="b", tags=["t"], groups=["g"], lineage=[("a@1", "compress")])
    removed = lib.remove("b")
    assert removed.id == eb.id and not eb.path.exists() and not eb.routing_path.exists()
    assert _files(lib) == ([ea.sha256], [f"{ea.routing_sha256}.safetensors"])
    with sqlite3.connect(lib.root / "library.sqlite") as db:
        for table in ("tags", "groups", "lineage"):
            assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE entry_id = ?", (eb.id,)).fetchone()[0] == 0
    report = lib.verify()
    assert report.ok and report.checked == 2
    lib.remove("a@1")  # a-copy still uses the same object: it stays
    assert ea2.path.is_dir() and ea2.routing_path.is_file() and lib.verify().ok
    lib.remove("a-copy")
    assert _files(lib) == ([], []) and lib.list() == []
    assert lib.verify().ok and lib.verify().checked == 0
    with pytest.raises(LibraryError, match="no library entry 'a-copy'"):
        lib.remove("a-copy")


def test_verify_names_corrupt_and_missing_files(tmp_path, lib, model):
    ea = lib.add(lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1), model=model, name="a")
    eb = lib.add(lora_dir(tmp_path / "b", model, r=2, targets=ATTN, seed=2), model=model, name="b")
    f = ea.path / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    eb.routing_path.unlink()
    report = lib.verify()
    assert not report.ok and report.checked == 2
    assert report.corrupt == [f"a@1: {f}: sha256 does not match the index"]
    assert report.missing == [f"b@1: {eb.routing_path} is missing"]
    with pytest.raises(dk.DeltakitFileError, match="does not match the manifest"):
        lib.load(make_model("llama"), "a")
    # adding the same adapters again puts good copies back
    lib.add(tmp_path / "a", model=model, name="a")
    lib.add(tmp_path / "b", model=model, name="b")
    assert lib.verify().ok and lib.verify().checked == 4
    x = make_input("llama")
    torch.testing.assert_close(run(dk.load_adapter(make_model("llama"), tmp_path / "a").model, x),
                               run(lib.load(make_model("llama"), "a@1").model, x))


def test_a_failed_insert_leaves_no_entry_and_no_files(tmp_path, lib, model, monkeypatch):
    a = lora_dir(tmp_path / "a", model, r=2, targets=ATTN, seed=1)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Index, "insert", staticmethod(boom))  # after the files are published
    with pytest.raises(RuntimeError, match="disk full"):
        lib.add(a, model=model, name="a")
    assert lib.list() == [] and _files(lib) == ([], []) and list(lib.root.joinpath("tmp").iterdir()) == []
    assert lib.verify().ok


@pytest.mark.slow
def test_a_crash_mid_add_leaves_no_entry_and_verify_cleans_the_orphans(tmp_path, lib):
    model = mlp()
    a = lora_dir(tmp_path / "a", model, r=2, targets=["0", "2"], seed=1)
    lib.add(lora_dir(tmp_path / "b", model, r=2, targets=["0", "2"], seed=2), model=model, name="kept")
    proc = mp.get_context("spawn").Process(target=crashing_add, args=(str(lib.root), str(a)))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 17
    assert [e.ref for e in lib.list()] == ["kept@1"]
    sha = sha256_file(a / "adapter.safetensors")
    report = lib.verify()
    assert not report.ok and report.checked == 1 and not report.missing and not report.corrupt
    assert any(f"objects/{sha} is not used" in o for o in report.orphans)
    assert any("routing/" in o for o in report.orphans) and any("tmp/" in o for o in report.orphans)
    cleaned = lib.verify(clean=True)
    assert len(cleaned.cleaned) == len(report.orphans) and cleaned.ok
    assert lib.verify().ok and len(_files(lib)[0]) == 1
    assert lib.add(a, model=model, name="retry").sha256 == sha and lib.verify().ok


@pytest.mark.slow
def test_concurrent_adds_from_four_processes_all_land(tmp_path, lib):
    model = mlp()
    dirs = [str(lora_dir(tmp_path / f"a{i}", model, r=1 + i % 3, targets=["0", "2"], seed=i)) for i in range(6)]
    jobs = [dirs[0:2], dirs[2:4], dirs[4:6], [dirs[0], dirs[5]]]  # overlapping content on purpose
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(add_worker, [(str(lib.root), job, "shared") for job in jobs])
    refs = sorted(r for rs in results for r in rs)
    assert sorted(e.ref for e in lib.list()) == refs and len(refs) == 8
    assert sorted(e.version for e in lib.list()) == list(range(1, 9))
    shas = {sha256_file(f"{d}/adapter.safetensors") for d in dirs}
    assert {e.sha256 for e in lib.list()} == shas and set(_files(lib)[0]) == shas
    report = lib.verify()
    assert report.ok and report.checked == 8


def test_conv1d_prototypes_live_in_the_input_space_and_embeddings_get_none(tmp_path):
    """GPT-2's Conv1D stores W as (in, out): the prototype is the top right-singular vector of the
    (out, in) map, i.e. width n_embd for c_attn (16), not its output width (48)."""
    gpt2 = make_model("gpt2")
    lib = AdapterLibrary(tmp_path / "lib")
    src = lora_dir(tmp_path / "g", gpt2, r=2, targets=["c_attn", "wpe"], seed=5)
    routing = lib.routing(lib.add(src, model=gpt2).ref)
    ad = dk.load_adapter(gpt2, src, name="g")
    for path, layer in gpt2.named_modules():
        if isinstance(layer, DeltaLayer) and path.endswith("c_attn"):
            dw = layer.weight_delta(["g"])["weight"].double().T      # (out 48, in 16)
            p = routing[f"prototype.{path}"]
            assert p.shape == (16,)
            _, _, Vh = torch.linalg.svd(dw)
            assert abs(float(p.double() @ Vh[0])) == pytest.approx(1.0, abs=1e-6)
    assert not any(k.endswith(".wpe") for k in routing) and ad is not None
