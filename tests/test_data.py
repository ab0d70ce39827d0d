import json

import pytest

from clada.calibrate.data import DataSpecError, load_documents, split_documents, strip_wiki_markup


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nstill first\n\n\n  \nsecond doc\r\n\r\nthird\n\n")
    docs = load_documents(str(path))
    assert docs.documents == ["first doc\nstill first", "second doc", "third"]
    assert docs.name == str(path)
    assert docs.identity["documents"] == 3
    assert docs.identity["source"] == str(path)
    assert len(docs.identity["sha256"]) == 64
    json.dumps(docs.identity)


def test_jsonl_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "alpha", "id": 1}\n\n{"text": " beta "}\n')
    assert load_documents(str(path)).documents == ["alpha", "beta"]


@pytest.mark.parametrize("line", ['{"text": "ok"', '{"body": "no text"}', '["text"]', '{"text": 3}'])
def test_bad_jsonl_line_is_named(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataSpecError, match=r"bad\.jsonl:2: ") as info:
        load_documents(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["wikitext", "missing.bin", "hf:only:two"])
def test_unknown_spec_lists_builtin_names_or_format(spec):
    with pytest.raises(DataSpecError, match="lee|NAME") as info:
        load_documents(spec)
    assert spec in str(info.value)


def test_unknown_name_lists_builtins():
    with pytest.raises(DataSpecError, match=r"'nope'.*lee, enwiki"):
        load_documents("nope")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataSpecError, match="absent.txt.*lee, enwiki"):
        load_documents(str(tmp_path / "absent.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataSpecError, match="no documents"):
        load_documents(str(empty))


@pytest.mark.parametrize("spec, expected", [
    ("hf:org/name:train:body", ("org/name", None, "train")),
    ("hf:org/name:cfg:validation:body", ("org/name", "cfg", "validation")),
])
def test_hub_spec_parsing(monkeypatch, spec, expected):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"body": ["one", " ", "two "], "other": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = load_documents(spec)
    assert calls == [expected] and docs.documents == ["one", "two"]
    assert docs.identity["source"] == spec
    with pytest.raises(DataSpecError, match="no field 'text'.*body, other"):
        load_documents("hf:org/name:train:text")


def test_hub_errors_become_one_line_spec_errors(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def fail(*args, **kwargs):
        raise FileNotFoundError("Dataset 'x/y' doesn't exist\non the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataSpecError, match=r"'hf:x/y:train:text': FileNotFoundError: .* on the Hub$"):
        load_documents("hf:x/y:train:text")


def test_split_is_deterministic_disjoint_and_complete():
    docs = [f"doc {i}" for i in range(20)]
    calib, heldout = split_documents(docs, 0.25, seed=3)
    assert (calib, heldout) == split_documents(docs, 0.25, seed=3)
    assert len(heldout) == 5 and len(calib) == 15
    assert sorted(calib + heldout) == sorted(docs)
    assert split_documents(docs, 0.25, seed=4) != (calib, heldout)


def test_split_keeps_both_parts_non_empty():
    assert split_documents(["a", "b"], 0.01) in ((["a"], ["b"]), (["b"], ["a"]))
    calib, heldout = split_documents(["a", "b", "c"], 0.99)
    assert len(calib) == 1 and len(heldout) == 2


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError):
        split_documents(["a", "b", "c"], fraction)


WIKI = """{{Infobox thing|name={{nested|x}}|note=[[Link]]}}
'''Thing''' is a [[concept|notion]] in [[philosophy]]<ref name="a">Cited {{cite|b}}</ref> and
a [http://example.com label] too.<ref name="b"/> See {{lang|x|}}[[:Category:Things|things]].
<!-- hidden comment -->
== History ==
{| class="wikitable"
| cell {{t|}} || [[cell link]]
|}
[[File:Pic.jpg|thumb|A [[caption]] here]]The &nbsp;history<br/>is ''long'' &amp; <span>odd</span>.
* list item
[[Category:Things]]
[[de:Ding]]
== References ==
{{reflist}}
tail text"""


def test_strip_wiki_markup():
    text = strip_wiki_markup(WIKI)
    for marker in ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "<span", "'''", "''", "<!--", "==",
                   "Infobox", "Cited", "cell", "caption", "Ding", "Pic.jpg", "tail text", "http"):
        assert marker not in text, marker
    assert "Thing is a notion in philosophy and\na label too. See things." in text
    assert "History" in text
    assert "The history is long & odd." in text
    assert "* list item" in text


@pytest.mark.real
def test_lee_documents():
    docs = load_documents("lee")
    assert len(docs.documents) > 100
    assert docs.identity["documents"] == len(docs.documents)


@pytest.mark.real
def test_enwiki_documents():
    docs = load_documents("enwiki")
    assert len(docs.documents) > 10
    for doc in docs.documents:
        assert len(doc.split()) >= 200
        assert "{{" not in doc and "[[" not in doc and "<ref" not in doc
    assert load_documents("enwiki").documents == docs.documents   # second load from the JSON cache
