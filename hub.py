"""A Hugging Face hub id -> a local model folder, failing within seconds when there is none.

preresq.load_model calls `local_snapshot` for anything that is not a local folder. A model in
the local hub cache is used as it is; otherwise it is downloaded, but only when HF_HUB_OFFLINE
is not set and huggingface.co answers within 3 s, so that an offline machine gets a clear
message at once instead of minutes of retries.
"""
import os
import socket


def local_snapshot(name: str) -> str:
    """The local snapshot folder of hub model `name` (e.g. "Qwen/Qwen2.5-VL-7B-Instruct").

    Raises OSError whose message says why and what to do (download it, pass a folder, or use
    a laptop preset).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    advice = (f"Download it first (`hf download {name}` on a machine with network) or pass a local "
              "folder with --model; a laptop preset needs no download: `python presets.py tiny` "
              "builds it and prints its folder.")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise OSError(f"model {name!r} is not in the local hub cache and HF_HUB_OFFLINE is set. {advice}")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise OSError(f"model {name!r} is not in the local hub cache and the hub cannot be "
                      f"reached. {advice}") from None
    try:
        return snapshot_download(name)
    except Exception as e:  # network errors come in many types; all end the same way
        raise OSError(f"could not download {name!r}: {e}. {advice}") from e
