"""Loading an HF model folder that may come from someone else: the one way the apps load weights and configs.

Two rules hold for every folder, whoever made it: no code of the folder's own runs (``trust_remote_code`` is
passed as the caller's setting, False unless the user turned it on: left unset, transformers would ask at the
terminal, or wait for an answer nobody gives in a batch job), and no pickle is unpickled (safetensors only: a
``pytorch_model.bin`` beside or instead of them is never read). Whatever the folder lacks or holds wrongly is
one ``InputError`` line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from refine.core.errors import InputError


def check_folder(path: str | Path, trust_remote_code: bool = False, weights: bool = True, what: str = "") -> Path:
    """``path`` as a model folder these rules can load, or one line saying why not (checked before transformers
    is asked, so its prompt, its pickle fallback and its tracebacks never come up)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise InputError(f"not a model folder (no config.json): {path}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path / 'config.json'} is not a JSON object")
    if config.get("auto_map") and not trust_remote_code:
        raise InputError(f"{path} asks to run code of its own (auto_map in config.json); refused: set "
                         f"trust_remote_code=true only for a folder you trust")
    if weights and not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in path.glob(pattern))
        raise InputError(f"no safetensors weights in {what + ' ' if what else ''}{path}" + (
            f" ({', '.join(pickled)}: pickled weights are not loaded; save it with safetensors, "
            f"save_pretrained(safe_serialization=True), where you trust it)" if pickled else ""))
    return path


def _one_line(path: Path, e: Exception) -> InputError:
    return InputError(f"cannot load a model from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def load_config(path: str | Path, trust_remote_code: bool = False):
    """The folder's ``AutoConfig``, every default filled in."""
    from transformers import AutoConfig

    check_folder(path, trust_remote_code, weights=False)
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise _one_line(Path(path), e) from None


def load_causal_lm(path: str | Path, dtype=None, trust_remote_code: bool = False, auto_class: str = "causal",
                   what: str = ""):
    """``AutoModelForCausalLM`` (``auto_class="base"``: ``AutoModel``) from the folder's safetensors; ``what``
    names the folder's kind in the refusal (``checkpoint``)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    check_folder(path, trust_remote_code, what=what)
    cls = AutoModelForCausalLM if auto_class == "causal" else AutoModel
    try:
        return cls.from_pretrained(str(path), dtype=dtype or torch.float32, local_files_only=True,
                                   use_safetensors=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise _one_line(Path(path), e) from None
