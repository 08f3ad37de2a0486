"""The authors' inference, as their scripts run it, for `evaluate.py --protocol authors`: their
prompts, their decoding on top of the checkpoint's generation config, and their parsers. It lets
this project's checkpoints be scored the way the paper's numbers were, to compare like with like;
what still differs is in docs/evaluation.md.
"""
import re

# The authors' inference scripts: one user turn, the question then their fixed instruction. The image
# text is their three strings joined as Python joins them (no space after "parts:" or "rating.").
_AUTHORS_TEMPLATE = ("{} First output the thinking process in <think> </think> tags and then output the final "
                     "answer with only one score in <answer> </answer> tags.")
AUTHORS_IMAGE_PROMPT = _AUTHORS_TEMPLATE.format(
    "You are doing the image quality assessment task. Compare the two distorted images and answer in five parts:"
    "saturation rating; granularity rating; sharpness rating; foreground rating; and background rating."
    "All ratings should be floats between 1 and 5, rounded to two decimals, where 1 represents very poor quality "
    "and 5 represents excellent quality.")
AUTHORS_VIDEO_PROMPT = _AUTHORS_TEMPLATE.format(
    "You are doing the video quality assessment task. Please compare the multi-frame images and evaluate their "
    "global temporal smoothness. Then compare and describe the rest magnifying local single frame pictures in five "
    "parts: saturation rating; granularity rating; sharpness rating; foreground rating; and background rating. "
    "Then, please rate both global and local quality of this video. The ratings should be two float scores between "
    "1 and 5, rounded to two decimal places, with 1 representing very poor quality and 5 representing excellent "
    "quality.")


def authors_label(k, video):
    """The text before picture k (from 0) in the authors' inference prompt: their video view labels, then
    "Picture k+1: ", which Qwen's chat template writes with add_vision_id=True (as their scripts call it)."""
    view = ("Global multiframe picture:" if k == 0 else f"Local single frame picture {k}:") if video else ""
    return f"{view}Picture {k + 1}: "


def authors_decoding(generation_config=None):
    """How the authors' inference samples: generate(do_sample=True, top_k=50, top_p=1, max_new_tokens=512)
    on top of the checkpoint's generation config, which supplies temperature and repetition penalty
    (Qwen2.5-VL's: 0.1 and 1.05; transformers' default 1.0 where unset). One answer per item."""
    temperature = getattr(generation_config, "temperature", None) or 1.0
    penalty = getattr(generation_config, "repetition_penalty", None) or 1.0
    return dict(samples=1, temperature=float(temperature), top_k=50, top_p=1.0,
                repetition_penalty=float(penalty), max_new_tokens=512)


def authors_score(text, video=False):
    """The authors' parsers, unclipped; None where their scripts substitute random.randint(1, 5).

    Image (inference_PreResIQA_R1): the first number (regex \\d+(\\.\\d+)?) of the last
    <answer>...</answer>, or of the whole text when it has none (of a five-aspect answer: the
    saturation rating). Video (inference_PreResVQA-R1): the mean of every number (\\d+\\.?\\d*)
    in the last <answer>...</answer>; no answer block or no number: None.
    """
    answers = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if video:
        numbers = [float(x) for x in re.findall(r"\d+\.?\d*", answers[-1])] if answers else []
        return sum(numbers) / len(numbers) if numbers else None
    found = re.search(r"\d+(\.\d+)?", answers[-1].strip() if answers else text.strip())
    return float(found.group()) if found else None
