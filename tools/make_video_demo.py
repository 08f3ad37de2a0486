"""The README's video pictures: a synthetic 4 s clip (640x360, 25 fps), a ball crossing a gradient,
the frame number drawn in each frame, so the sampled indices can be read off the views.

    python tools/make_video_demo.py ball.mp4 && python video.py ball.mp4 --out docs
"""
import sys
import numpy as np
from PIL import Image, ImageDraw, ImageFont
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from support import synthetic

def frames(n=100, w=640, h=360):
    font = ImageFont.load_default(size=72)
    y, x = np.mgrid[0:h, 0:w]
    sky = np.stack([40 + 100 * y // h, 90 + 120 * y // h, 200 - 60 * y // h], -1).astype(np.uint8)
    for i in range(n):
        im = Image.fromarray(sky)
        d = ImageDraw.Draw(im)
        cx = 40 + (w - 80) * i / (n - 1)
        cy = h - 60 - 220 * abs(np.sin(np.pi * 2 * i / n))
        d.ellipse((cx - 30, cy - 30, cx + 30, cy + 30), fill=(250, 200, 40))
        d.rectangle((0, h - 30, w, h), fill=(60, 140, 60))
        d.text((20, 10), f"{i}", font=font, fill=(255, 255, 255))
        yield np.asarray(im)

synthetic.write_clip(sys.argv[1], frames())
