"""What the paper's six files stand on (none of them is imported here): the shared prompt of a GRPO
group (prompt_sharing, preresq.py's only helper), label files (label_formats), each benchmark's own
files and the set names (benchmarks), the synthetic data (synthetic), reading video frames (frames),
the authors' inference for evaluate.py --protocol authors (authors_protocol), the tools'
command-line conventions (cli), files on disk (files) and the reward in plain loops
(rewards_reference)."""
