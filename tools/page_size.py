"""The pages' size at the scale of a 7B run on KonIQ: 1024 x 768 pictures of noise (what JPEG
compresses worst), answers of about 1,400 characters, G = 12 then 6, 20 logged steps of 8 images,
1,000 steps and 2,015 held-out items; the evaluation page with 8 sampled answers per item.

    python tools/page_size.py
"""
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules
from harness import report_page  # noqa: E402

rng, random = np.random.default_rng(0), random.Random(0)
folder = Path(tempfile.mkdtemp())
files = []
for k in range(40):
    files.append(str(folder / f"{k}.jpg"))
    Image.fromarray(rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8)).save(files[-1], quality=90)
text = ("<think>" + "The image shows moderate noise in the sky and slight blur on the edges. " * 18
        + "</think><answer>3.1\n2.9\n3.3\n3.0\n3.2</answer>")
terms = dict(format=1.0, pair_fidelity=0.8, triplet_accuracy=0.6, group_rank=0.5, aspect_spread_penalty=0.1,
             triplet_balance=0.4)


def answer():
    return dict(text=text, scores=[3.1, 2.9, 3.3, 3.0, 3.2], terms=terms, total=2.4,
                advantage=random.uniform(-1, 1), length=256)


rollouts = [dict(step=s, stage=1 if s <= 500 else 2, groups=[
    dict(file=files[(s + i) % 40], mos=3.0, prompt="Rate this picture. " * 20,
         answers=[answer() for _ in range(12 if s <= 500 else 6)]) for i in range(8)]) for s in range(50, 1001, 50)]
metrics = [dict(step=s, reward=random.random()) for s in range(1, 1001)]
evals = [dict(step=s, srcc=random.random(), plcc=random.random()) for s in range(0, 1001, 100)]
items = [dict(file=files[k % 40], mos=random.uniform(1, 5), prediction=random.uniform(1, 5)) for k in range(2015)]
page = report_page.training_page(metrics, evals, rollouts, items)
print(f"training page: {len(page.encode()) / 1024:.0f} KB")
rows = [dict(path=files[k % 40], mos=random.uniform(1, 5), score=random.uniform(1, 5), saturation=3.0,
             parsed=k % 50 != 0, text="\n---\n".join([text] * 8)) for k in range(2015)]
page = report_page.evaluation_page("koniq-test", dict(protocol="ours", n=1975), rows)
print(f"evaluation page: {len(page.encode()) / 1024:.0f} KB")
