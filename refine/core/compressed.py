"""Compressed corpus files (gzip, zstd, bzip2, xz) as streams of bytes, decompressed on the fly and never whole in
memory; a corrupt or truncated file is one ``InputError`` line with the compressed byte offset."""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

from refine.core.errors import InputError

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bzip2", ".xz": "xz"}
ZSTD_MAX_WINDOW = 1 << 27    # zstd's default decoder limit (ZSTD_WINDOWLOG_LIMIT_DEFAULT): what a window costs
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ZstdWindowError(Exception):
    """A zstd frame asks for a larger window (decoder memory) than ``ZSTD_MAX_WINDOW``."""

    def __init__(self, window: int):
        super().__init__(f"a {window} byte window")
        self.window = window


def zstd_window(header: bytes) -> int | None:
    """The window a zstd frame header asks for (RFC 8878 3.1.1.1), or None when ``header`` is not one."""
    if len(header) < 6 or header[:4] != ZSTD_MAGIC:
        return None
    descriptor = header[4]
    if not descriptor & 0x20:                            # a window descriptor byte: exponent and mantissa
        base = 1 << (10 + (header[5] >> 3))
        return base + (base >> 3) * (header[5] & 7)
    at = 5 + (0, 1, 2, 4)[descriptor & 3]               # single segment: the window is the content size
    size = (1, 2, 4, 8)[descriptor >> 6]
    if len(header) < at + size:
        return None
    return int.from_bytes(header[at:at + size], "little") + (256 if size == 2 else 0)


def _size(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


class _ZstdRaw(io.RawIOBase):
    """A zstd stream (one or more frames) as a bounded reader. Input goes in 1 KiB pieces so that one read holds at
    most ~32 MiB however compressible the data (a zstd block of 4 bytes can stand for 128 KiB); a file that ends
    inside a frame is an ``EOFError``, as gzip, bz2 and xz report it (zstandard's own reader ends silently)."""

    PIECE = 1 << 10

    def __init__(self, raw):
        import zstandard

        self._raw, self._new = raw, zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj
        self._d, self._fed, self._out = self._new(), False, memoryview(b"")
        self._head = b""                                 # the current frame's first bytes: its window

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._out:
            data = self._raw.read(self.PIECE)
            if not data:
                if self._fed and not self._d.eof:
                    raise EOFError("compressed file ended before the end of a zstd frame")
                return 0
            chunks = []
            while data:                                  # a piece may end one frame and start the next
                if self._d.eof:
                    self._d, self._head = self._new(), b""
                self._fed = True
                if len(self._head) < 18:
                    self._head += data[:18 - len(self._head)]
                    window = zstd_window(self._head)
                    if window is not None and window > ZSTD_MAX_WINDOW:
                        raise ZstdWindowError(window)
                chunks.append(self._d.decompress(data))
                data = self._d.unused_data if self._d.eof else b""
            self._out = memoryview(b"".join(chunks))
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def _decompress_errors() -> tuple[type[BaseException], ...]:
    import lzma
    import zlib

    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error, lzma.LZMAError]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


@contextmanager
def open_stream(f: Path):
    """``f``'s bytes as a buffered stream, decompressed on the fly by its suffix (never whole in memory).
    A corrupt or truncated compressed file is one InputError line with the compressed byte offset."""
    compression = COMPRESSIONS.get(f.suffix.lower())
    with f.open("rb") as raw:               # a Path, or a streamed hub shard (hub_corpus)
        if compression is None:
            yield raw
            return
        if compression == "gzip":
            import gzip
            fh = gzip.GzipFile(fileobj=raw, mode="rb")
        elif compression == "bzip2":
            import bz2
            fh = bz2.BZ2File(raw, mode="rb")
        elif compression == "xz":
            import lzma
            fh = lzma.LZMAFile(raw, mode="rb")
        else:
            try:
                fh = io.BufferedReader(_ZstdRaw(raw), 1 << 16)
            except ImportError:
                raise InputError(f"{f}: reading .zst needs the zstandard package (pip install zstandard)") from None
        try:
            yield fh
        except InputError:
            raise
        except ZstdWindowError as e:
            raise InputError(f"{f}: a zstd frame near compressed byte {raw.tell()} needs a {_size(e.window)} "
                             f"window (zstd --long=N, N > 27, makes those); refused: over the "
                             f"{_size(ZSTD_MAX_WINDOW)} a window may take here (that much memory per stream); "
                             f"recompress it without --long, or with --long=27 or less") from None
        except _decompress_errors() as e:
            if isinstance(e, OSError) and getattr(e, "errno", None) is not None:
                raise                                    # a real I/O error of the disk, not of the data
            raise InputError(f"{f}: corrupt or truncated {compression} data near compressed byte {raw.tell()} "
                             f"of {f.stat().st_size} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                             ) from None
