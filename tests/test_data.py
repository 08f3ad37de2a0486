"""Tests for data.py, label_formats.py, benchmarks.py and synthetic.py: fixture folders in each
dataset's native format, label parsing, splits, errors, image decoding, and the synthetic sets'
quality order (checked with PSNR)."""
import collections
import csv
import json
import os
import re
import sys
import zipfile
from xml.sax.saxutils import escape

import av
import numpy as np
import pytest
import scipy.io
from PIL import Image

from support import benchmarks, label_formats
import data
from support import synthetic
from data import DataError


# --------------------------------------------------------------------------- fixture helpers

def touch(path, content=b""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)


def write_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def col_letters(i):
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def write_xlsx(path, sheets, inline=False):
    """A minimal .xlsx as spreadsheet programs write it: shared strings (or inline strings),
    numbers, one worksheet part per sheet. sheets: {name: rows}; a None row leaves a gap."""
    shared, index = [], {}

    def cell(ref, v):
        if v is None:
            return ""
        if isinstance(v, (int, float)):
            return f'<c r="{ref}"><v>{v}</v></c>'
        if inline:
            return f'<c r="{ref}" t="inlineStr"><is><t>{escape(v)}</t></is></c>'
        index.setdefault(v, len(shared))
        if index[v] == len(shared):
            shared.append(v)
        return f'<c r="{ref}" t="s"><v>{index[v]}</v></c>'

    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    parts = {}
    for n, (name, rows) in enumerate(sheets.items(), start=1):
        xml_rows = "".join(
            f'<row r="{r}">' + "".join(cell(f"{col_letters(c)}{r}", v) for c, v in enumerate(row)) + "</row>"
            for r, row in enumerate(rows, start=1) if row is not None)
        parts[f"xl/worksheets/sheet{n}.xml"] = f'<worksheet xmlns="{main}"><sheetData>{xml_rows}</sheetData></worksheet>'
    sheet_list = "".join(f'<sheet name="{escape(n)}" sheetId="{i}" r:id="rId{i}"/>'
                         for i, n in enumerate(sheets, start=1))
    parts["xl/workbook.xml"] = f'<workbook xmlns="{main}" xmlns:r="{rel}"><sheets>{sheet_list}</sheets></workbook>'
    parts["xl/_rels/workbook.xml.rels"] = (
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        + "".join(f'<Relationship Id="rId{i}" Type="{rel}/worksheet" Target="worksheets/sheet{i}.xml"/>'
                  for i in range(1, len(sheets) + 1)) + "</Relationships>")
    if shared:
        parts["xl/sharedStrings.xml"] = (f'<sst xmlns="{main}">' + "".join(f"<si><t>{escape(s)}</t></si>" for s in shared)
                                         + "</sst>")
    parts["[Content_Types].xml"] = '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>'
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, text in parts.items():
            z.writestr(name, '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>' + text)


def mos_of(items):
    return {os.path.basename(i.path): i.mos for i in items}


def check_rescaled(items, raws, lower_is_better=False):
    """Every item's mos equals the hand formula 1 + 4 (x - min) / (max - min) (flipped if needed)."""
    lo, hi = min(raws), max(raws)
    for it in items:
        x = (hi - it.raw) if lower_is_better else (it.raw - lo)
        assert it.mos == pytest.approx(1 + 4 * x / (hi - lo))
    assert min(i.mos for i in items) == pytest.approx(1) and max(i.mos for i in items) == pytest.approx(5)


# --------------------------------------------------------------------------- label-file readers

def test_rescale_hand_worked():
    assert data.rescale([2.0, 4.0, 10.0]) == [1.0, 2.0, 5.0]
    assert data.rescale([2.0, 4.0, 10.0], lower_is_better=True) == [5.0, 4.0, 1.0]
    with pytest.raises(DataError, match="equal"):
        data.rescale([3.0, 3.0])


def test_read_xlsx_shared_inline_numbers_and_sheets(tmp_path):
    rows = [["title only"], None, ["vid", "MOS full", None, "note"], ["a_360P-1", 3.5, None, "x"], ["b_4K-2", 4.25]]
    write_xlsx(tmp_path / "s.xlsx", {"diff": [["x"]], "MOS": rows})
    got = label_formats.read_xlsx(str(tmp_path / "s.xlsx"), "MOS")
    assert got == [["title only"], [], ["vid", "MOS full", None, "note"], ["a_360P-1", 3.5, None, "x"], ["b_4K-2", 4.25]]
    assert label_formats.read_xlsx(str(tmp_path / "s.xlsx")) == [["x"]]  # default: the first sheet
    write_xlsx(tmp_path / "i.xlsx", {"S": rows}, inline=True)
    assert label_formats.read_xlsx(str(tmp_path / "i.xlsx")) == got
    with pytest.raises(DataError, match="no sheet 'nope'.*diff"):
        label_formats.read_xlsx(str(tmp_path / "s.xlsx"), "nope")
    touch(str(tmp_path / "bad.xlsx"), b"not a zip")
    with pytest.raises(DataError, match="bad.xlsx"):
        label_formats.read_xlsx(str(tmp_path / "bad.xlsx"))


def test_read_xlsx_rich_text_and_phonetic_runs(tmp_path):
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    write_xlsx(tmp_path / "r.xlsx", {"S": [["placeholder", 1]]})
    with zipfile.ZipFile(tmp_path / "r.xlsx") as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["xl/sharedStrings.xml"] = (f'<sst xmlns="{main}"><si><r><t>Image</t></r><r><t xml:space="preserve"> name</t>'
                                       f'</r><rPh><t>IGNORED</t></rPh></si></sst>').encode()
    with zipfile.ZipFile(tmp_path / "r.xlsx", "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    assert label_formats.read_xlsx(str(tmp_path / "r.xlsx")) == [["Image name", 1.0]]


def test_read_mat_v5_cells_and_clear_errors(tmp_path):
    names = np.array(["t1.bmp", "long_name.bmp"], dtype=object).reshape(-1, 1)
    scipy.io.savemat(tmp_path / "a.mat", {"names": names, "mos": np.array([[10.5, 70.0]])})
    got_names, got_mos = label_formats.read_mat(str(tmp_path / "a.mat"), "names", "mos")
    assert [label_formats.mat_str(n) for n in got_names] == ["t1.bmp", "long_name.bmp"]
    assert list(got_mos) == [10.5, 70.0]
    with pytest.raises(DataError, match=r"no variable\(s\) \['dmos'\].*'mos', 'names'"):
        label_formats.read_mat(str(tmp_path / "a.mat"), "dmos")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\x00\x02IM"
    touch(str(tmp_path / "v73.mat"), header + bytes(512))
    with pytest.raises(DataError, match="v7.3.*-v7"):
        label_formats.read_mat(str(tmp_path / "v73.mat"), "mos")
    touch(str(tmp_path / "junk.mat"), b"hello world" * 3)
    with pytest.raises(DataError, match="junk.mat"):
        label_formats.read_mat(str(tmp_path / "junk.mat"), "mos")


def test_read_labels_text_formats(tmp_path):
    p = tmp_path / "gt.txt"
    p.write_text("# comment\n10004473376.jpg 4.4789 0.5273\n\n5.51429 i01_01_1.bmp\n0_0.png 0_1.png 4.5692\n"
                 "yfcc-batch1/747.mp4, 3.8720\nA0001_00_00.bmp,1520.06\n")
    rows = data.read_labels(str(p))
    assert [(r.name, r.raw, r.ref) for r in rows] == [
        ("10004473376.jpg", 4.4789, None), ("i01_01_1.bmp", 5.51429, None), ("0_1.png", 4.5692, "0_0.png"),
        ("yfcc-batch1/747.mp4", 3.872, None), ("A0001_00_00.bmp", 1520.06, None)]
    assert {r.group for r in rows} == {str(p)}
    h = tmp_path / "h.csv"
    h.write_text("name,mos\na.png,1\nb.png,2\n")
    assert [r.name for r in data.read_labels(str(h))] == ["a.png", "b.png"]


@pytest.mark.parametrize("body, line, fragment", [
    ("a.png 1\nb.png\nc.png 3\n", 2, "'b.png'"),
    ("a.png 1\nb.png 2\nc.png nan\n", 3, "c.png nan"),
    ("a.png 1\nb.png x y z\n", 2, "b.png x y z"),
    ("name mos\na.png 1\nname mos\n", 3, "name mos"),  # only the first line may be a header
])
def test_read_labels_malformed_row_names_file_line_and_row(tmp_path, body, line, fragment):
    p = tmp_path / "bad.txt"
    p.write_text(body)
    with pytest.raises(DataError) as e:
        data.read_labels(str(p))
    assert str(p) in str(e.value) and f"line {line}" in str(e.value) and fragment in str(e.value)


def test_read_labels_training_jsonl_shapes(tmp_path):
    prompt = "You are doing the image quality assessment task. ..."
    lines = [  # PreResQ-R1's RL-KADID-10K_train_scoring_5aware.jsonl and VQAThinker's LSVQ jsonl
        {"id": 1, "dataset_name": "KADID-10K", "image": ["I01_01_01.png"],
         "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": 4.633587786259543}]},
        {"id": 2, "dataset_name": "LSVQ", "image": ["yfcc-batch16/13078.mp4"],
         "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "3.418571"}]},
        {"video": "a.mp4", "mos": 2.5},
        {"path": "b.png", "gt_score": 1.25},
    ]
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = data.read_labels(str(p))
    assert [(r.name, r.raw) for r in rows] == [("I01_01_01.png", 4.633587786259543),
                                               ("yfcc-batch16/13078.mp4", 3.418571), ("a.mp4", 2.5), ("b.png", 1.25)]
    q = tmp_path / "list.json"
    q.write_text(json.dumps(lines[:2]))
    assert [r.raw for r in data.read_labels(str(q))] == [4.633587786259543, 3.418571]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "mos": 1}\n{"image": ["a.png", "b.png"], "mos": 2}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2.*no single file"):
        data.read_labels(str(bad))
    bad.write_text('{"image": "a.png", "mos": 1}\n{"image": "b.png", \n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2.*invalid JSON"):
        data.read_labels(str(bad))


def test_read_labels_names_with_spaces(tmp_path):
    """A name with spaces is the text before the score (after it in 'mos name'); a row of two names is
    'ref dist mos' only when both are file names of one kind; a row that may be either is refused."""
    p = tmp_path / "gt.txt"
    p.write_text("my photo.png 4.0\nphoto.png 2.0\nmy  nice photo.png 3.5 0.4\n5.5 tid photo.bmp\n"
                 "0_0.png 0_1.png 4.5\nno extension 1.5\n3015973424 4.64\n")
    assert [(r.name, r.raw, r.ref) for r in data.read_labels(str(p))] == [
        ("my photo.png", 4.0, None), ("photo.png", 2.0, None), ("my  nice photo.png", 3.5, None),
        ("tid photo.bmp", 5.5, None), ("0_1.png", 4.5, "0_0.png"), ("no extension", 1.5, None),
        ("3015973424", 4.64, None)]
    p.write_text("a.png 1\nb.png 1 2 3\n")  # three numbers: no format has them
    with pytest.raises(DataError, match=r"gt.txt, line 2: expected 'name mos \[std\]'"):
        data.read_labels(str(p))
    for body in ("a.png 1\n, 3\n", "a.png 1\n, b.png, 3\n"):
        p.write_text(body)
        with pytest.raises(DataError, match=r"gt.txt, line 2: empty file name"):
            data.read_labels(str(p))
    p.write_text("a.png 1\nholiday.v2 final.png 3\n")
    with pytest.raises(DataError, match=r"gt.txt, line 2: .*'ref dist mos' or a name with a space.*commas"):
        data.read_labels(str(p))
    for name in ("my photo.png", "photo.png", "other.png"):
        touch(str(tmp_path / name))
    p.write_text("my photo.png 4.0\nphoto.png 2.0\nother.png 3\n")  # the picture named, not photo.png
    items = data.load_dataset("labels", str(tmp_path), "all", labels=str(p))
    assert {os.path.basename(i.path): i.raw for i in items} == {"my photo.png": 4.0, "photo.png": 2.0, "other.png": 3.0}


@pytest.mark.parametrize("body, where, words", [
    ("a.png nan\nb.png 2\nc.png 3\n", "line 1", "score 'nan' is not finite"),  # a first row is no header
    ("a.png inf\nb.png 2\n", "line 1", "score 'inf' is not finite"),
    ("a.png 1e400\nb.png 2\n", "line 1", "score '1e400' is not finite"),
    ("a.png -Infinity\nb.png 2\n", "line 1", "is not finite"),
    ("a.png four\nb.png 2\n", "line 1", "expected 'name mos [std]'"),
    ("name mos\na.png 1\nb.png 1e400\n", "line 3", "score '1e400' is not finite"),
    ("a.png, \nb.png, 2\n", "line 1", "expected"),
    ('{"image": "a.png", "mos": true}\n{"image": "b.png", "mos": 2}\n', "line 1", "score True is not a number"),
    ('{"image": "a.png", "mos": 1}\n{"image": "b.png", "mos": "high"}\n', "line 2", "'high' is not a number"),
    ('{"image": "a.png", "mos": NaN}\n', "line 1", "is not finite"),
    ('{"image": "a.png", "mos": 1e400}\n', "line 1", "is not finite"),
    ('{"image": "a.png", "mos": 1' + "0" * 400 + '}\n', "line 1", "is not finite"),
    ('{"image": "a.png", "mos": [3]}\n', "line 1", "is not a number"),
    ('{"image": "a.png", "mos": null}\n', "line 1", "the score is empty"),
    ('[{"image": "a.png", "mos": 1}, {"image": "b.png", "mos": false}]', "item 2", "is not a number"),
])
def test_a_score_must_be_a_finite_number_in_every_row(tmp_path, body, where, words):
    p = tmp_path / "gt.jsonl"
    p.write_text(body)
    with pytest.raises(DataError) as e:
        data.read_labels(str(p))
    assert f"{p}, {where}: " in str(e.value) and words in str(e.value)


def test_a_header_is_a_first_row_without_numbers_or_file_names(tmp_path):
    p = tmp_path / "gt.txt"
    for header in ("name mos", "image_name,MOS_zscore", "dist_img ref_img dmos"):
        p.write_text(f"{header}\n0.png 0.png 1\n")
        assert [r.name for r in data.read_labels(str(p))] == ["0.png"]


def test_conflicting_duplicates_and_unscalable_ranges_are_refused(tmp_path, capsys):
    for name in ("a.png", "b.png", "c.png"):
        touch(str(tmp_path / name))
    p = tmp_path / "gt.txt"
    p.write_text("a.png 1\nb.png 2\n./a.png 3\nc.png 4\n")
    with pytest.raises(DataError, match=rf"'./a.png' is listed twice with different scores: 1 at {p}, line 1 "
                                        rf"and 3 at {p}, line 3"):
        data.load_dataset("labels", str(tmp_path), "all", labels=str(p))
    assert data.main(["--data", "labels", "--data-root", str(tmp_path), "--labels", str(p)]) == 2
    assert "problems: none" not in capsys.readouterr().out
    p.write_text("a.png 1\nb.png 2\na.png 1\nc.png 4\n")  # the same score twice is no conflict
    assert len(data.load_dataset("labels", str(tmp_path), "all", labels=str(p))) == 4
    p.write_text("a.png 1e308\nb.png -1e308\nc.png 0\n")  # each finite, their range not
    with pytest.raises(DataError, match=rf"{p}: the scores run from -1e\+308 to 1e\+308, a range too large"):
        data.load_dataset("labels", str(tmp_path), "all", labels=str(p))


def test_a_label_file_not_in_utf8_is_named_and_the_fix_given(tmp_path):
    p = tmp_path / "gt.txt"
    p.write_text("a.png 1\nb.png 2\n", encoding="utf-16")
    with pytest.raises(DataError, match=rf"label file {p} is not UTF-8 text .*: save it as UTF-8$"):
        data.read_labels(str(p))
    make_agiqa(str(tmp_path / "agiqa"))
    csv_file = tmp_path / "agiqa" / "data.csv"
    csv_file.write_text(csv_file.read_text().replace("a cat", "a café"), encoding="latin-1")
    with pytest.raises(DataError, match=r"data.csv is not UTF-8 text.*save it as UTF-8"):
        data.load_dataset("agiqa", str(tmp_path / "agiqa"), "all")


def test_a_training_set_mixing_images_and_videos_is_refused(tmp_path, capsys):
    """Each training step gives its items one prompt (the first item used to decide the set's kind);
    evaluation prompts each item by its own kind, so load_dataset still reads the mix."""
    for name in ("a.png", "b.mp4", "c.png", "d.mp4"):
        touch(str(tmp_path / name))
    p = tmp_path / "mixed.txt"
    p.write_text("a.png 1\nb.mp4 2\nc.png 3\nd.mp4 4\n")
    with pytest.raises(DataError) as e:
        data.load_datasets("labels", str(tmp_path), "all", labels=str(p))
    assert (f"{p} mixes images and videos (first image {tmp_path / 'a.png'}, first video {tmp_path / 'b.mp4'})"
            in str(e.value))
    assert [i.is_video for i in data.load_dataset("labels", str(tmp_path), "all", labels=str(p))] == [0, 1, 0, 1]
    assert data.main(["--data", "labels", "--data-root", str(tmp_path), "--labels", str(p), "--split", "all"]) == 1
    assert "mixes images and videos" in capsys.readouterr().out
    (tmp_path / "videos.txt").write_text("b.mp4 2\nd.mp4 4\n")
    sets = data.load_datasets("labels", str(tmp_path), "all", labels=str(tmp_path / "videos.txt"))
    assert [i.is_video for i in sets["videos"]] == [True, True]


def test_a_folder_or_label_file_with_a_comma_in_its_name(tmp_path):
    """--data-root and --labels are split on commas only when the whole value is not an existing path."""
    folder = tmp_path / "photos, 2024"
    for name in ("a.png", "b.png"):
        touch(str(folder / name))
    (folder / "gt, v2.txt").write_text("a.png 1\nb.png 2\n")
    sets = data.load_datasets("labels", str(folder), "all", labels=str(folder / "gt, v2.txt"))
    assert [os.path.basename(i.path) for i in sets["gt, v2"]] == ["a.png", "b.png"]
    assert data.pair_sets("labels", str(folder), str(folder / "gt, v2.txt")) == [
        ("labels", str(folder), str(folder / "gt, v2.txt"))]
    assert data.pair_sets("synthetic,labels", ",x", "y.txt") == [("synthetic", None, None), ("labels", "x", "y.txt")]


# --------------------------------------------------------------------------- native fixtures

def make_koniq(root, with_sets=True):
    names = [f"{1000 + i}.jpg" for i in range(10)]
    sets = ["training"] * 6 + ["validation"] * 2 + ["test"] * 2
    scores = [3.9 + 9.0 * i for i in range(10)]
    os.makedirs(root, exist_ok=True)
    if with_sets:
        write_csv(f"{root}/koniq10k_distributions_sets.csv",
                  [["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"]]
                  + [[n, 0, 0, 0.5, 0.5, 0, 100, s, 0.5, st] for n, s, st in zip(names, scores, sets)])
    else:
        with open(f"{root}/koniq10k_scores_and_distributions.csv", "w") as f:
            f.write('"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"\n')
            for n, s in zip(names, scores):
                f.write(f'"{n}",0,0,0.5,0.5,0,100,3.1,0.5,{s}\n')
    for n in names:
        touch(f"{root}/1024x768/{n}")
    return scores


def make_spaq(root):
    scores = [float(x) for x in (0, 12, 25, 37, 50, 62, 75, 87, 93, 100)]
    write_xlsx(f"{root}/Annotations/MOS and Image attribute scores.xlsx",
               {"Sheet1": [["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]]
                + [[f"{i + 1:05d}.jpg", s, 50, 50, 50, 50, 50] for i, s in enumerate(scores)]})
    for i in range(len(scores)):
        touch(f"{root}/TestImage/{i + 1:05d}.jpg")
    return scores


def make_kadid(root, refs=81):
    rows, scores = [["dist_img", "ref_img", "dmos", "var"]], []
    for r in range(1, refs + 1):
        for level in (1, 5):
            dist, score = f"I{r:02d}_01_{level:02d}.png", 1.0 + r * 0.04 + (5 - level) * 0.1
            rows.append([dist, f"I{r:02d}.png", score, 0.1])
            scores.append(score)
            touch(f"{root}/images/{dist}")
        touch(f"{root}/images/I{r:02d}.png")
    write_csv(f"{root}/dmos.csv", rows)
    return scores


def make_livec(root):
    names = ["t1.bmp", "t2.bmp", "3.bmp", "4.bmp", "5.bmp"]
    scores = [3.42, 100.0, 50.0, 20.5, 77.0]
    os.makedirs(f"{root}/Data")
    scipy.io.savemat(f"{root}/Data/AllImages_release.mat",
                     {"AllImages_release": np.array(names, dtype=object).reshape(-1, 1)})
    scipy.io.savemat(f"{root}/Data/AllMOS_release.mat", {"AllMOS_release": np.array([scores])})
    for n in names:
        touch(f"{root}/Images/trainingImages/{n}" if n.startswith("t") else f"{root}/Images/{n}")
    return scores


def make_agiqa(root):
    scores = [0.2, 4.5, 1.1, 3.3]
    write_csv(f"{root}/data.csv", [["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality",
                                    "mos_align", "std_align"]]
              + [[f"midjourney_normal_{i:03d}.jpg", "a cat, on a mat", "", "", "", s, 0.5, 3, 0.5]
                 for i, s in enumerate(scores)])
    for i in range(len(scores)):
        touch(f"{root}/midjourney_normal_{i:03d}.jpg")
    return scores


def make_pipal(root):
    labels = {"A0001": [1520.06, 1300.0], "A0002": [900.5, 1840.0]}
    for ref, scores in labels.items():
        touch(f"{root}/Train_Ref/{ref}.bmp")
        lines = []
        for k, s in enumerate(scores):
            lines.append(f"{ref}_00_{k:02d}.bmp,{s}")
            touch(f"{root}/Train_Dist/{ref}_00_{k:02d}.bmp")
        touch(f"{root}/Train_Label/{ref}.txt", ("\n".join(lines) + "\n").encode())
    return [s for v in labels.values() for s in v]


def make_tid2013(root):
    # The label file spells some names in upper case (I01_11_1.BMP) while the files are lower case.
    rows = [(5.51429, "i01_01_1.bmp"), (0.24242, "I01_11_1.BMP"), (3.0, "i02_01_1.bmp"), (9.0, "i03_01_1.bmp")]
    touch(f"{root}/mos_with_names.txt", "".join(f"{s} {n}\n" for s, n in rows).encode())
    for _, n in rows:
        touch(f"{root}/distorted_images/{n.lower()}")
    return [s for s, _ in rows]


def make_csiq(root):
    rows = [["CSIQ DMOS"], None, None, [None, None, None, "image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"]]
    entries = [(1600, "noise", 1, 0.06), (1600, "jpeg 2000", 3, 0.5), ("fisher", "blur", 5, 0.9),
               ("fisher", "contrast", 2, 0.0)]
    for k, (img, kind, lev, dmos) in enumerate(entries):
        rows.append([None, None, None, img, k, kind, lev, 0.1, dmos])
    write_xlsx(f"{root}/csiq.DMOS.xlsx", {"note": [["readme"]], "all_by_image": rows})
    for rel in ("awgn/1600.AWGN.1.png", "jpeg2000/1600.jpeg2000.3.png", "blur/fisher.BLUR.5.png",
                "contrast/fisher.contrast.2.png"):
        touch(f"{root}/dst_imgs/{rel}")
    return [e[3] for e in entries]


def make_bid(root):
    scores = [0.5, 4.9, 3.2]
    write_xlsx(f"{root}/DatabaseGrades.xlsx",
               {"Plan1": [["Image Number", "Average Subjective Score"]] + [[i + 1, s] for i, s in enumerate(scores)]})
    for i in range(len(scores)):
        touch(f"{root}/ImageDatabase/DatabaseImage{i + 1:04d}.JPG")
    return scores


def make_live(root):
    os.makedirs(root, exist_ok=True)
    names = [f"{folder}/img{i}.bmp" for folder, n in benchmarks._LIVE_FOLDERS for i in range(1, n + 1)]
    rng = np.random.default_rng(0)
    dmos = rng.uniform(0, 100, len(names))
    orgs = np.zeros(len(names))
    orgs[::5] = 1  # reference images inside the folders: dropped
    dmos[orgs == 1] = 0.0
    refs = np.array([f"ref{i % 29}.bmp" for i in range(len(names))], dtype=object)
    scipy.io.savemat(f"{root}/dmos.mat", {"dmos": dmos[None], "orgs": orgs[None]})
    scipy.io.savemat(f"{root}/refnames_all.mat", {"refnames_all": refs[None]})
    for n, o in zip(names, orgs):
        if not o:
            touch(f"{root}/{n}")
    return list(dmos[orgs == 0])


def make_lsvq(root):
    header = ["name", "p1", "p2", "p3", "height", "width", "mos_p1", "mos_p2", "mos_p3", "mos", "frame_number",
              "is_test"]
    main = [("ia-batch1/a", 10.0, "False"), ("ia-batch1/b", 90.0, "False"), ("yfcc-batch2/3", 55.5, "False"),
            ("yfcc-batch2/4", 40.0, "True"), ("ia-batch3/c", 70.0, "True")]
    hd = [("ia-batch9/h1", 30.0), ("ia-batch9/h2", 80.0)]
    write_csv(f"{root}/labels_train_test.csv", [header] + [[n, 0, 0, 0, 540, 960, 0, 0, 0, m, 240, t] for n, m, t in main])
    write_csv(f"{root}/labels_test_1080p.csv", [header[:-1]] + [[n, 0, 0, 0, 1080, 1920, 0, 0, 0, m, 240] for n, m in hd])
    for n, *_ in main + hd:
        touch(f"{root}/{n}.mp4")
    return [m for _, m, _ in main], [m for _, m in hd]


def make_konvid(root):
    scores = [1.22, 4.64, 3.0]
    write_csv(f"{root}/KoNViD_1k_mos.csv", [["flickr_id", "mos"]] + [[3015973424 + i, s] for i, s in enumerate(scores)])
    for i in range(len(scores)):
        touch(f"{root}/KoNViD_1k_videos/{3015973424 + i}.mp4")
    return scores


def make_livevqc(root):
    os.makedirs(root, exist_ok=True)
    names, scores = ["A001.mp4", "A002.mp4", "B101.mp4"], [6.2, 94.3, 50.0]
    scipy.io.savemat(f"{root}/data.mat", {"video_list": np.array(names, dtype=object).reshape(-1, 1),
                                          "mos": np.array(scores).reshape(-1, 1)})
    for n in names:
        touch(f"{root}/Video/{n}")
    return scores


def make_youtube(root):
    rows = [["vid", "MOS full", "MOS chunk"], ["Animation_360P-08c9", 3.9, 3.8], ["Gaming_1080P-0ce6", 1.24, 1.3],
            ["Sports_2160P-1b70", 4.7, 4.6]]
    write_xlsx(f"{root}/original_videos_MOS_for_YouTube_UGC_dataset.xlsx", {"diff": [["x"]], "MOS": rows})
    touch(f"{root}/Animation_360P-08c9.mkv")
    touch(f"{root}/Gaming_1080P-0ce6.mp4")
    touch(f"{root}/Sports_2160P-1b70.mp4")
    return [r[1] for r in rows[1:]]


NATIVE = {  # name: (builder, number of items, lower is better, video)
    "koniq": (make_koniq, 10, False, False), "spaq": (make_spaq, 10, False, False),
    "kadid": (make_kadid, 162, False, False), "livec": (make_livec, 5, False, False),
    "agiqa": (make_agiqa, 4, False, False), "pipal": (make_pipal, 4, False, False),
    "tid2013": (make_tid2013, 4, False, False), "csiq": (make_csiq, 4, True, False),
    "bid": (make_bid, 3, False, False), "live": (make_live, 785, True, False),
    "konvid": (make_konvid, 3, False, True), "livevqc": (make_livevqc, 3, False, True),
    "youtube-ugc": (make_youtube, 3, False, True),
}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_native_format_counts_rescaling_and_files(tmp_path, name):
    build, count, lower, video = NATIVE[name]
    raws = build(str(tmp_path))
    items = data.load_dataset(name, str(tmp_path), "all")
    assert len(items) == count
    assert sorted(i.raw for i in items) == pytest.approx(sorted(raws))
    check_rescaled(items, raws, lower)
    assert all(os.path.isabs(i.path) and os.path.isfile(i.path) and i.dataset == name for i in items)
    assert all(i.is_video == video for i in items)


def test_native_details_refs_and_paths(tmp_path):
    make_csiq(str(tmp_path / "csiq"))
    csiq = {os.path.relpath(i.path, tmp_path / "csiq"): i for i in data.load_dataset("csiq", str(tmp_path / "csiq"), "all")}
    assert csiq["dst_imgs/jpeg2000/1600.jpeg2000.3.png"].ref == "1600"
    assert csiq["dst_imgs/awgn/1600.AWGN.1.png"].mos == pytest.approx(1 + 4 * (0.9 - 0.06) / 0.9)  # DMOS flipped
    make_tid2013(str(tmp_path / "tid"))
    tid = data.load_dataset("tid2013", str(tmp_path / "tid"), "all")
    assert {os.path.basename(i.path) for i in tid} == {"i01_01_1.bmp", "i01_11_1.bmp", "i02_01_1.bmp", "i03_01_1.bmp"}
    assert sorted(i.ref for i in tid) == ["I01", "I01", "I02", "I03"]
    make_livec(str(tmp_path / "livec"))
    assert sorted(os.path.relpath(i.path, tmp_path / "livec") for i in data.load_dataset("livec", str(tmp_path / "livec"), "all"))[:2] == [
        "Images/3.bmp", "Images/4.bmp"]
    make_pipal(str(tmp_path / "pipal"))
    pipal = mos_of(data.load_dataset("pipal", str(tmp_path / "pipal"), "all"))
    # one rescaling across all Train_Label files: min in A0002.txt, max in A0002.txt, A0001 in between
    assert pipal["A0001_00_00.bmp"] == pytest.approx(1 + 4 * (1520.06 - 900.5) / (1840 - 900.5))
    make_live(str(tmp_path / "live"))
    live = data.load_dataset("live", str(tmp_path / "live"), "all")
    assert {i.path.split(os.sep)[-2] for i in live} == {"jp2k", "jpeg", "wn", "gblur", "fastfading"}
    assert all(i.ref.startswith("ref") for i in live)


def test_koniq_official_split_and_missing_split_file(tmp_path):
    make_koniq(str(tmp_path / "a"))
    sizes = {s: len(data.load_dataset("koniq", str(tmp_path / "a"), s)) for s in ("train", "val", "test", "all")}
    assert sizes == {"train": 6, "val": 2, "test": 2, "all": 10}
    make_koniq(str(tmp_path / "b"), with_sets=False)  # scores file only: MOS_zscore, no split
    items = data.load_dataset("koniq", str(tmp_path / "b"), "all")
    assert min(i.raw for i in items) == pytest.approx(3.9)
    with pytest.raises(DataError, match="no split 'train'.*koniq10k_distributions_sets.csv"):
        data.load_dataset("koniq", str(tmp_path / "b"), "train")


KADID_LISTS = {"train": data.KADID_TRAIN_REFS, "val": data.KADID_VAL_REFS, "test": data.KADID_TEST_REFS}


def test_kadid_lists_are_disjoint_and_cover_the_81_references():
    assert {s: len(refs) for s, refs in KADID_LISTS.items()} == {"train": 49, "val": 16, "test": 16}
    every = [r for refs in KADID_LISTS.values() for r in refs]
    assert len(every) == len(set(every)) == 81  # disjoint
    assert set(every) == {f"I{k:02d}" for k in range(1, 82)}
    assert set(data.KADID_VAL_REFS) == {"I07", "I12", "I14", "I15", "I16", "I27", "I32", "I35", "I36", "I41", "I44",
                                        "I49", "I55", "I66", "I67", "I70"}  # the authors' val list


def test_kadid_split_is_the_authors_by_reference(tmp_path):
    make_kadid(str(tmp_path))
    split = {s: data.load_dataset("kadid", str(tmp_path), s) for s in ("train", "val", "test")}
    refs = {s: {i.ref for i in items} for s, items in split.items()}
    assert {r[:-4] for r in refs["test"]} == set(data.KADID_TEST_REFS)
    assert (len(refs["train"]), len(refs["val"]), len(refs["test"])) == (49, 16, 16)
    assert not (refs["train"] & refs["val"]) and not (refs["train"] & refs["test"]) and not (refs["val"] & refs["test"])
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (98, 32, 32)
    for s, items in split.items():  # every image lands in its reference's list, path and ref agreeing
        assert all(os.path.basename(i.path)[:3] in KADID_LISTS[s] and i.ref[:-4] in KADID_LISTS[s] for i in items), s
    assert {i.ref[:-4] for i in data.load_dataset("kadid", str(tmp_path), "test", seed=7)} == set(data.KADID_TEST_REFS)
    # rescaled once over the whole label file (min 1.04 at I01, max 4.64 at I81), not per split
    for it in split["test"]:
        assert it.mos == pytest.approx(1 + 4 * (it.raw - 1.04) / (4.64 - 1.04))
    assert min(i.mos for i in split["test"]) > 1.5


def test_kadid_split_does_not_depend_on_the_seed(tmp_path):
    make_kadid(str(tmp_path))
    for s in ("train", "val", "test"):
        assert data.load_dataset("kadid", str(tmp_path), s, seed=7) == data.load_dataset("kadid", str(tmp_path), s, seed=42)


def test_kadid_partial_copy_and_unknown_reference(tmp_path):
    make_kadid(str(tmp_path), refs=3)  # I01..I03, all three in the authors' train list
    assert {i.ref for i in data.load_dataset("kadid", str(tmp_path), "train")} == {"I01.png", "I02.png", "I03.png"}
    assert data.load_dataset("kadid", str(tmp_path), "val") == []
    path = tmp_path / "dmos.csv"
    path.write_text(path.read_text().replace(",I03.png,", ",ref03.png,"))  # a renamed reference
    with pytest.raises(DataError, match=r"1 reference image\(s\) not among KADID-10k's I01..I81.*ref03.png"):
        data.load_dataset("kadid", str(tmp_path), "train")
    assert len(data.load_dataset("kadid", str(tmp_path), "all")) == 6


def test_random_split_seeded_disjoint_by_reference(tmp_path):
    make_spaq(str(tmp_path / "spaq"))
    train = data.load_dataset("spaq", str(tmp_path / "spaq"), "train")
    test = data.load_dataset("spaq", str(tmp_path / "spaq"), "test")
    assert (len(train), len(test)) == (8, 2)
    assert not {i.path for i in train} & {i.path for i in test}
    assert test == data.load_dataset("spaq", str(tmp_path / "spaq"), "test")
    assert any(data.load_dataset("spaq", str(tmp_path / "spaq"), "test", seed=s) != test for s in range(5))
    with pytest.raises(DataError, match="no split 'val'.*'train', 'test', 'all'"):
        data.load_dataset("spaq", str(tmp_path / "spaq"), "val")
    make_tid2013(str(tmp_path / "tid"))  # references I01 (2 images), I02, I03: I01's pair stays together
    for seed in range(6):
        tr = data.load_dataset("tid2013", str(tmp_path / "tid"), "train", seed=seed)
        te = data.load_dataset("tid2013", str(tmp_path / "tid"), "test", seed=seed)
        assert len(tr) + len(te) == 4 and not {i.ref for i in tr} & {i.ref for i in te}


def test_lsvq_splits_and_per_file_rescaling(tmp_path):
    main, hd = make_lsvq(str(tmp_path))
    split = {s: data.load_dataset("lsvq", str(tmp_path), s) for s in ("train", "test", "test-1080p", "all")}
    assert [len(split[s]) for s in ("train", "test", "test-1080p", "all")] == [3, 2, 2, 7]
    assert {i.raw for i in split["test"]} == {40.0, 70.0}
    check_rescaled(split["train"] + split["test"], main)
    check_rescaled(split["test-1080p"], hd)  # its own label file, its own 1..5
    assert all(i.is_video for i in split["all"])


def test_generic_labels_dataset_with_refs(tmp_path):
    for i in range(6):
        touch(str(tmp_path / "imgs" / f"{i}_0.png"))
        touch(str(tmp_path / "imgs" / f"{i}_1.png"))
    lines = "".join(f"imgs/{i}_0.png imgs/{i}_{k}.png {1 + i * 0.5 + k * 0.2}\n" for i in range(6) for k in (0, 1))
    (tmp_path / "GT_pairs.txt").write_text(lines)
    items = data.load_dataset("labels", str(tmp_path), "all", labels=str(tmp_path / "GT_pairs.txt"))
    assert len(items) == 12 and {i.dataset for i in items} == {"GT_pairs"}
    check_rescaled(items, [1 + i * 0.5 + k * 0.2 for i in range(6) for k in (0, 1)])
    train = data.load_dataset("labels", str(tmp_path), "train", labels=str(tmp_path / "GT_pairs.txt"))
    test = data.load_dataset("labels", str(tmp_path), "test", labels=str(tmp_path / "GT_pairs.txt"))
    assert (len(train), len(test)) == (10, 2) and not {i.ref for i in train} & {i.ref for i in test}


# --------------------------------------------------------------------------- bad input

def test_malformed_native_row_fails_at_open_with_file_line_row(tmp_path):
    make_kadid(str(tmp_path), refs=3)
    path = tmp_path / "dmos.csv"
    lines = path.read_text().splitlines()
    lines[2] = "I01_01_05.png,I01.png,abc,0.1"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        data.load_dataset("kadid", str(tmp_path), "train")
    assert str(path) in str(e.value) and "line 3" in str(e.value) and "abc" in str(e.value)


def test_bad_values_in_native_files_fail_at_open(tmp_path):
    make_koniq(str(tmp_path / "koniq"))
    path = tmp_path / "koniq" / "koniq10k_distributions_sets.csv"
    path.write_text(path.read_text().replace("validation", "valid", 1))
    with pytest.raises(DataError, match=r"koniq10k_distributions_sets.csv, line 8: set must be one of"):
        data.load_dataset("koniq", str(tmp_path / "koniq"), "all")
    make_lsvq(str(tmp_path / "lsvq"))
    path = tmp_path / "lsvq" / "labels_train_test.csv"
    path.write_text(path.read_text().replace("True", "maybe", 1))
    with pytest.raises(DataError, match=r"labels_train_test.csv, line 5: is_test must be True or False"):
        data.load_dataset("lsvq", str(tmp_path / "lsvq"), "train")
    make_livec(str(tmp_path / "livec"))
    scipy.io.savemat(tmp_path / "livec" / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([[1.0, np.nan, 3, 4, 5]])})
    with pytest.raises(DataError, match=r"AllMOS_release.mat, entry 2: score 'nan' is not finite in row 't2.bmp'"):
        data.load_dataset("livec", str(tmp_path / "livec"), "all")
    make_csiq(str(tmp_path / "csiq"))
    write_xlsx(str(tmp_path / "csiq" / "csiq.DMOS.xlsx"), {"all_by_image": [["image", "dst_type", "dst_lev", "dmos"],
                                                                            [1600, "gamma", 1, 0.2]]})
    with pytest.raises(DataError, match="dst_type 'gamma'"):
        data.load_dataset("csiq", str(tmp_path / "csiq"), "all")


def test_empty_and_odd_cells_in_native_files_are_named(tmp_path):
    """Every reader: an empty cell, a cell of several values, a flag that is neither 0 nor 1, a boolean, a
    fractional image number, a missing score and mismatched arrays are a DataError naming file and entry."""
    def refused(name, root, *words):
        with pytest.raises(DataError) as e:
            data.load_dataset(name, str(root), "all")
        assert all(w in str(e.value) for w in words), str(e.value)

    make_livec(str(tmp_path / "livec"))
    names = np.empty((5, 1), dtype=object)
    names[:, 0] = [np.array(["t1.bmp"]), np.array([]), np.array(["3.bmp"]), np.array(["4.bmp"]), np.array(["5.bmp"])]
    scipy.io.savemat(tmp_path / "livec" / "Data" / "AllImages_release.mat", {"AllImages_release": names})
    refused("livec", tmp_path / "livec", "AllImages_release.mat, entry 2: an empty cell")
    names[1, 0] = np.array(["  "])
    scipy.io.savemat(tmp_path / "livec" / "Data" / "AllImages_release.mat", {"AllImages_release": names})
    refused("livec", tmp_path / "livec", "AllImages_release.mat, entry 2: an empty name")
    mos = np.empty((1, 5), dtype=object)
    mos[0] = [np.array([1.0]), np.array([2.0, 3.0]), np.array([3.0]), np.array([4.0]), np.array([5.0])]
    names[1, 0] = np.array(["t2.bmp"])
    scipy.io.savemat(tmp_path / "livec" / "Data" / "AllImages_release.mat", {"AllImages_release": names})
    scipy.io.savemat(tmp_path / "livec" / "Data" / "AllMOS_release.mat", {"AllMOS_release": mos})
    refused("livec", tmp_path / "livec", "AllMOS_release.mat, entry 2: 2 values")

    make_livevqc(str(tmp_path / "vqc"))
    scipy.io.savemat(tmp_path / "vqc" / "data.mat", {"video_list": np.array(["A001.mp4", "A002.mp4", "B101.mp4"],
                                                                            dtype=object).reshape(-1, 1),
                                                     "mos": np.array([[6.2], [94.3]])})
    refused("livevqc", tmp_path / "vqc", "data.mat lists 3 videos in video_list but 2 scores")

    make_live(str(tmp_path / "live"))
    mat = scipy.io.loadmat(tmp_path / "live" / "dmos.mat")
    mat["orgs"][0, 3] = np.nan
    scipy.io.savemat(tmp_path / "live" / "dmos.mat", {"dmos": mat["dmos"], "orgs": mat["orgs"]})
    refused("live", tmp_path / "live", "dmos.mat, entry 4: orgs is 'nan'", "0 (distorted) or 1")

    make_bid(str(tmp_path / "bid"))
    grades = tmp_path / "bid" / "DatabaseGrades.xlsx"
    write_xlsx(str(grades), {"Plan1": [["Image Number", "Score"], [1, 0.5], [2], [3, 3.2]]})
    refused("bid", tmp_path / "bid", "DatabaseGrades.xlsx, line 3: the score is empty")
    write_xlsx(str(grades), {"Plan1": [["Image Number", "Score"], [1, 0.5], [2.5, 4.9], [3, 3.2]]})
    refused("bid", tmp_path / "bid", "DatabaseGrades.xlsx, line 3: image number 2.5 is not a whole number")
    write_xlsx(str(grades), {"Plan1": [["Image Number", "Score"], [1, 0.5], [2, 4.9], [3, 3.2]]})
    with zipfile.ZipFile(grades) as z:
        parts = {n: z.read(n) for n in z.namelist()}
    sheet = parts["xl/worksheets/sheet1.xml"].decode()
    parts["xl/worksheets/sheet1.xml"] = sheet.replace('<c r="B3"><v>4.9</v></c>', '<c r="B3" t="b"><v>1</v></c>').encode()
    with zipfile.ZipFile(grades, "w") as z:
        for n, b in parts.items():
            z.writestr(n, b)
    refused("bid", tmp_path / "bid", "DatabaseGrades.xlsx, line 3: score True is not a number")

    make_csiq(str(tmp_path / "csiq"))
    write_xlsx(str(tmp_path / "csiq" / "csiq.DMOS.xlsx"), {"all_by_image": [["image", "dst_type", "dst_lev", "dmos"],
                                                                            [1600, "noise", 2.5, 0.2]]})
    refused("csiq", tmp_path / "csiq", "csiq.DMOS.xlsx", "dst_lev 2.5")

    make_kadid(str(tmp_path / "kadid"), refs=3)
    dmos = tmp_path / "kadid" / "dmos.csv"
    dmos.write_text(dmos.read_text().replace("I02_01_05.png,I02.png,1.08", "I02_01_05.png,I02.png,"))
    refused("kadid", tmp_path / "kadid", "dmos.csv, line 5: the score is empty")


def test_scores_whose_range_overflows_never_reach_the_correlations(tmp_path):
    """Each score finite, their range over a float: refused with the file named, not rescaled to NaN."""
    make_koniq(str(tmp_path))
    path = tmp_path / "koniq10k_distributions_sets.csv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(",3.9,", ",-1.7e308,")
    lines[2] = lines[2].replace(",12.9,", ",1.7e308,")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}: the scores run from -1.7e\+308 to 1.7e\+308"):
        data.load_dataset("koniq", str(tmp_path), "all")


def test_missing_files_one_error_with_count_first_paths_and_layout(tmp_path):
    make_kadid(str(tmp_path), refs=3)
    for name in ("I01_01_01.png", "I02_01_05.png", "I03_01_01.png"):
        os.remove(tmp_path / "images" / name)
    with pytest.raises(DataError) as e:
        data.load_dataset("kadid", str(tmp_path), "all")
    msg = str(e.value)
    assert "3 of 6 labelled files" in msg and "images/I01_01_01.png" in msg and "dmos.csv" in msg
    assert data.DATASETS["kadid"].layout in msg


def test_unknown_name_and_missing_root_list_known_sets(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_dataset("konik", str(tmp_path))
    for name, info in data.DATASETS.items():
        assert name in str(e.value) and info.download in str(e.value)
    with pytest.raises(DataError, match="needs --data-root.*database.mmsp-kn.de"):
        data.load_dataset("koniq")
    with pytest.raises(DataError, match="not a folder"):
        data.load_dataset("koniq", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="none of .*dmos.csv"):
        data.load_dataset("kadid", str(tmp_path))
    make_kadid(str(tmp_path / "kadid10k"), refs=2)  # the archive unpacked into its own folder
    with pytest.raises(DataError, match=f"use --data-root {tmp_path / 'kadid10k'}$"):
        data.load_dataset("kadid", str(tmp_path))
    with pytest.raises(DataError, match="needs --labels"):
        data.load_dataset("labels", str(tmp_path))
    with pytest.raises(DataError, match="only read with --data labels"):
        data.load_dataset("kadid", str(tmp_path), labels="x.txt")


def test_load_datasets_pairs_names_and_roots(tmp_path):
    make_koniq(str(tmp_path / "koniq"))
    make_spaq(str(tmp_path / "spaq"))
    (tmp_path / "GT.txt").write_text("1024x768/1000.jpg 1\n1024x768/1001.jpg 2\n1024x768/1002.jpg 3\n")
    sets = data.load_datasets("koniq, spaq,labels", f"{tmp_path}/koniq,{tmp_path}/spaq,{tmp_path}/koniq", "all",
                              labels=str(tmp_path / "GT.txt"))
    assert {k: len(v) for k, v in sets.items()} == {"koniq": 10, "spaq": 10, "GT": 3}
    assert all(i.dataset == k for k, v in sets.items() for i in v)
    with pytest.raises(DataError, match=r"2 sets .* 1 folder\(s\); give one per set"):
        data.load_datasets("koniq,spaq", f"{tmp_path}/koniq")
    with pytest.raises(DataError, match=r"3 sets .* 2 folder\(s\)"):
        data.load_datasets("koniq,spaq,kadid", f"{tmp_path}/koniq,{tmp_path}/spaq")
    with pytest.raises(DataError, match="'labels' 1 time.*2 file"):
        data.load_datasets("labels", str(tmp_path), labels="a.txt,b.txt")
    with pytest.raises(DataError, match="appears twice"):
        data.load_datasets("koniq,koniq", f"{tmp_path}/koniq,{tmp_path}/koniq", "all")


def test_cli_summary_and_problems(tmp_path, capsys):
    make_kadid(str(tmp_path), refs=81)
    assert data.main(["kadid", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train\s+98\s", out) and re.search(r"val\s+32\s", out) and re.search(r"test\s+32\s", out)
    assert re.search(r"all\s+162\s+1\.04\s+4\.64\s+1\.000\s+5\.000", out) and "problems: none" in out
    os.remove(tmp_path / "images" / "I19_01_01.png")
    assert data.main(["kadid", "--data-root", str(tmp_path), "--split", "test"]) == 1
    assert "1 of 32 labelled files" in capsys.readouterr().out
    assert data.main(["nope"]) == 2 and "data.py: error: unknown dataset" in capsys.readouterr().err


def test_cli_check_images_reports_undecodable(tmp_path, capsys):
    for i in range(3):
        Image.new("RGB", (16, 12), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
    touch(str(tmp_path / "3.png"), b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "gt.txt").write_text("0.png 1\n1.png 2\n2.png 3\n3.png 4\n")
    assert data.main(["labels", "--data-root", str(tmp_path), "--labels", str(tmp_path / "gt.txt"),
                      "--split", "all", "--check-images"]) == 1
    out = capsys.readouterr().out
    assert "decoded 3 of 4 files" in out and "3.png" in out


# --------------------------------------------------------------------------- images

def test_load_image_exif_orientation(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = (255, 0, 0)  # left half red
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = data.load_image(str(tmp_path / "o.jpg"))
    assert out.size == (10, 20) and out.mode == "RGB"
    px = np.asarray(out, dtype=int)
    assert px[2, 5, 0] > 200 and px[17, 5, 0] < 60  # the red half is now on top


def test_load_image_modes_to_rgb(tmp_path):
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    g = np.asarray(data.load_image(str(tmp_path / "g16.png")), dtype=int)
    assert g.shape == (32, 32, 3) and np.abs(g[..., 0] - np.round(ramp / 257)).max() <= 1
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    assert np.asarray(data.load_image(str(tmp_path / "c.jpg")))[4, 4].tolist() == pytest.approx([255, 0, 255], abs=3)
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    assert np.asarray(data.load_image(str(tmp_path / "l.png")))[0, 0].tolist() == [77, 77, 77]
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "a.png")  # transparent -> white background
    assert np.asarray(data.load_image(str(tmp_path / "a.png")))[0, 0].tolist() == [255, 255, 255]
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(data.load_image(str(tmp_path / "p.png")))[0, 0].tolist() == [10, 200, 30]
    Image.new("LA", (8, 8), (50, 128)).save(tmp_path / "la.png")
    assert np.asarray(data.load_image(str(tmp_path / "la.png")))[0, 0].tolist() == pytest.approx([152] * 3, abs=1)


def test_load_image_huge_downscaled_keeping_aspect(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=80)
    im = data.load_image(str(tmp_path / "big.jpg"), max_pixels=200 * 150)
    assert im.width * im.height <= 200 * 150 and im.size == (200, 150)
    Image.fromarray(rng.integers(0, 255, (300, 900, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    im = data.load_image(str(tmp_path / "wide.png"), max_pixels=10_000)
    assert im.width * im.height <= 10_000 and abs(im.width / im.height - 3) < 0.05
    assert data.load_image(str(tmp_path / "wide.png"), max_pixels=10**7).size == (900, 300)


def test_load_image_truncated_corrupt_missing_raise_dataerror(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(tmp_path / "t.jpg")
    whole = (tmp_path / "t.jpg").read_bytes()
    touch(str(tmp_path / "cut.jpg"), whole[: len(whole) // 2])
    for name, pattern in (("cut.jpg", "truncated"), ("missing.png", "does not exist")):
        with pytest.raises(DataError) as e:
            data.load_image(str(tmp_path / name))
        assert str(tmp_path / name) in str(e.value) and pattern in str(e.value)
    touch(str(tmp_path / "junk.png"), b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="junk.png.*re-download"):
        data.load_image(str(tmp_path / "junk.png"))


def test_a_decompression_bomb_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """Over Pillow's limit: one warning line naming the file, once, and no Python warning from site-packages;
    over twice the limit (Pillow refuses it): a DataError that says so, not 'truncated or corrupt'."""
    Image.new("RGB", (16, 10), (9, 9, 9)).save(tmp_path / "big.png")
    Image.new("RGB", (40, 10), (9, 9, 9)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(sys, "argv", ["preresq.py"])
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert data.load_image(str(tmp_path / "big.png")).size == (16, 10)
        data.check_readable(str(tmp_path / "big.png"))
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"preresq.py: warning: {tmp_path / 'big.png'} is 16 x 10 pixels")
    for call in (data.load_image, data.check_readable):
        with pytest.raises(DataError) as e:
            call(str(tmp_path / "huge.png"))
        assert str(tmp_path / "huge.png") in str(e.value) and "downscale" in str(e.value)
        assert "corrupt" not in str(e.value)


# --------------------------------------------------------------------------- synthetic data

def psnr(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return 10 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2))


def by_source_and_type(items, ext):
    """{(ref, type): {level: path}} from the synthetic file names s003_blur2.png."""
    out = collections.defaultdict(dict)
    for it in items:
        m = re.fullmatch(rf"s\d+_([a-z]+)(\d){ext}", os.path.basename(it.path))
        if m:
            out[(it.ref, m[1])][int(m[2])] = it
    return out


MARGIN_DB = 0.5  # neighbouring levels must differ by at least this much PSNR


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """A private PRERESQ_CACHE, so that the cache is built (and checked) by these tests."""
    root = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRERESQ_CACHE", root)
        yield root


def test_synthetic_default_set_splits_mos_and_cache(synthetic_root):
    train = data.load_dataset("synthetic", split="train")
    test = data.load_dataset("synthetic", split="test")
    assert (len(train), len(test)) == (297, 99)
    folder = os.path.dirname(train[0].path)
    assert folder.startswith(synthetic_root) and os.path.basename(folder) == "synthetic-1-42-112x112-36-2"
    assert not {i.ref for i in train} & {i.ref for i in test}  # no source shared
    assert Image.open(train[0].path).size == (112, 112)
    levels = collections.Counter()
    for it in train + test:
        m = re.fullmatch(r"s\d+(?:_[a-z]+(\d))?\.png", os.path.basename(it.path))
        level = int(m[1] or 0)
        assert it.mos == pytest.approx(5 - 0.8 * level) and it.raw == pytest.approx(it.mos)
        levels[level] += 1
    assert levels == {0: 36, 1: 72, 2: 72, 3: 72, 4: 72, 5: 72}
    kinds = {k for _, k in by_source_and_type(train, r"\.png")}
    assert kinds == set(synthetic.DISTORTIONS) and {k for _, k in by_source_and_type(test, r"\.png")} == set(synthetic.DISTORTIONS)
    # the cache is an ordinary GT dataset
    assert data.load_dataset("labels", folder, "all", labels=os.path.join(folder, "test.txt")) == [
        data.Item(i.path, i.mos, i.raw, "test", i.ref) for i in test]
    # second open reads the cache instead of regenerating
    before = os.stat(train[0].path).st_mtime_ns
    assert data.load_dataset("synthetic", split="train") == train and os.stat(train[0].path).st_mtime_ns == before
    assert not [n for n in os.listdir(synthetic_root) if n.startswith(".")]  # no temporary folder left


def test_synthetic_quality_order_is_real(synthetic_root):
    """Per source and distortion type, PSNR against the pristine source falls strictly with
    the level, by at least MARGIN_DB between neighbours (measured minimum ~0.67 dB, motion blur)."""
    items = data.load_dataset("synthetic", split="all")
    groups = by_source_and_type(items, r"\.png")
    assert len(groups) == 72
    for (ref, kind), levels in groups.items():
        src = Image.open(os.path.join(os.path.dirname(levels[1].path), ref))
        p = [psnr(src, Image.open(levels[k].path)) for k in range(1, 6)]
        assert all(a - b >= MARGIN_DB for a, b in zip(p, p[1:])), (ref, kind, np.round(p, 2))


def test_synthetic_deterministic_per_seed_and_params_checked(tmp_path):
    a = data.synthetic_dataset(str(tmp_path / "a"), "all", seed=3, n_sources=4)
    b = data.synthetic_dataset(str(tmp_path / "b"), "all", seed=3, n_sources=4)
    c = data.synthetic_dataset(str(tmp_path / "c"), "all", seed=4, n_sources=4)
    read = lambda items: [open(i.path, "rb").read() for i in items]
    assert len(a) == 44 and read(a) == read(b)
    assert [os.path.basename(i.path) for i in a] != [os.path.basename(i.path) for i in c] or read(a) != read(c)
    with pytest.raises(DataError, match="made with"):
        data.synthetic_dataset(str(tmp_path / "a"), "all", seed=5, n_sources=4)
    touch(str(tmp_path / "busy" / "something.txt"))
    with pytest.raises(DataError, match="not a synthetic set"):
        data.synthetic_dataset(str(tmp_path / "busy"), "all", n_sources=4)
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "busy", "c"]  # failed builds leave nothing behind


def decoded_luma(path):
    with av.open(path) as c:
        rgb = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float64)
    return rgb @ np.array([0.299, 0.587, 0.114])


@pytest.mark.slow
def test_synthetic_video_quality_order_and_format(tmp_path):
    """Luma PSNR against the rendered pan falls strictly from pristine through levels 1..5 for
    compression, stutter and blur, by at least MARGIN_DB (measured minimum ~0.94 dB)."""
    train = data.synthetic_video_dataset(str(tmp_path / "v"), "train", seed=1, n_sources=4)
    test = data.synthetic_video_dataset(str(tmp_path / "v"), "test", seed=1, n_sources=4)
    assert (len(train), len(test)) == (48, 16) and all(i.is_video for i in train + test)
    with av.open(train[0].path) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.width, s.height, s.format.name, s.average_rate) == ("h264", 128, 96, "yuv420p", 8)
        assert sum(1 for _ in c.decode(video=0)) == 32
    groups = by_source_and_type(train + test, r"\.mp4")
    assert {k for _, k in groups} == set(synthetic.VIDEO_DISTORTIONS) and len(groups) == 12
    for (ref, kind), levels in groups.items():
        s = int(ref[1:4])
        src = synthetic.landscape(np.random.default_rng([1, s]), 128 + synthetic.PAN_SPEED * 32, 96)
        rendered = np.stack([np.asarray(f) for f in synthetic.pan_clip(src, 32, 128, 96)]).astype(np.float64)
        rendered = rendered @ np.array([0.299, 0.587, 0.114])
        pristine = os.path.join(os.path.dirname(levels[1].path), ref)
        p = [psnr(rendered, decoded_luma(pristine))] + [psnr(rendered, decoded_luma(levels[k].path)) for k in range(1, 6)]
        assert all(a - b >= MARGIN_DB for a, b in zip(p, p[1:])), (ref, kind, np.round(p, 2))
    again = data.synthetic_video_dataset(str(tmp_path / "w"), "test", seed=1, n_sources=4)
    assert all(np.array_equal(decoded_luma(x.path), decoded_luma(y.path)) for x, y in zip(test[:4], again[:4]))
