"""Parquet page headers read before pyarrow decodes a page (``refine.core.columnar`` says what is bounded and
why): the footer's column-chunk offsets and each chunk's page headers, in Thrift's compact protocol, read here
because pyarrow's Python ``RowGroupMetaData.column`` aborts the process on some damaged footers."""

from __future__ import annotations

from collections.abc import Iterator

from refine.core.errors import InputError

MAX_PAGE_HEADER = 16 << 20   # pyarrow's own limit on a Thrift page header
PAGE_TYPES = {0: "data", 1: "index", 2: "dictionary", 3: "data v2"}


class Truncated(Exception):
    """The header goes on past the bytes read."""


class _Thrift:
    """Just enough of Thrift's compact protocol to read a parquet ``PageHeader``: ints and nested structs are
    kept ({field id: value}), everything else skipped, all of it bounds-checked."""

    def __init__(self, data: bytes):
        self.d, self.i = data, 0

    def byte(self) -> int:
        if self.i >= len(self.d):
            raise Truncated
        self.i += 1
        return self.d[self.i - 1]

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 70:
                raise ValueError("a varint longer than 10 bytes")

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def skip_bytes(self, n: int) -> None:
        if n < 0:
            raise ValueError("a negative length")
        if self.i + n > len(self.d):
            raise Truncated
        self.i += n

    def value(self, t: int, depth: int):
        if t in (1, 2):                                  # bool in a list (in a struct field it has no payload)
            return self.byte() == 1
        if t == 3:
            return self.byte()
        if t in (4, 5, 6):
            return self.zigzag()
        if t == 7:
            self.skip_bytes(8)
            return None
        if t == 8:
            self.skip_bytes(self.varint())
            return None
        if t in (9, 10):
            head = self.byte()
            n, et = head >> 4, head & 0x0F
            if n == 15:
                n = self.varint()
            for _ in range(n):
                self.value(et, depth + 1)
            return None
        if t == 11:
            n = self.varint()
            if n:
                kv = self.byte()
                for _ in range(n):
                    self.value(kv >> 4, depth + 1)
                    self.value(kv & 0x0F, depth + 1)
            return None
        if t == 12:
            return self.struct(depth + 1)
        raise ValueError(f"Thrift type {t}")

    def fields(self) -> Iterator[tuple[int, int]]:
        """(field id, type) of each field of a struct; the caller reads or ``skip``s each value."""
        fid = 0
        while True:
            head = self.byte()
            if head == 0:
                return
            delta, t = head >> 4, head & 0x0F
            fid = fid + delta if delta else self.zigzag()
            yield fid, t

    def skip(self, t: int) -> None:
        if t not in (1, 2):                              # a bool field's value is its type
            self.value(t, 1)

    def struct(self, depth: int = 0) -> dict:
        if depth > 16:
            raise ValueError("structs nested too deeply")
        return {fid: (t == 1) if t in (1, 2) else self.value(t, depth) for fid, t in self.fields()}

    def structs(self, t: int) -> int:
        """The length of a list of structs (the list header read)."""
        if t != 9:
            raise ValueError(f"Thrift type {t} where a list belongs")
        head = self.byte()
        n = head >> 4 if head >> 4 != 15 else self.varint()
        if head & 0x0F != 12:
            raise ValueError(f"a list of Thrift type {head & 0x0F} where structs belong")
        return n


def chunk_metadata(fh, file_size: int, leaves: set[int]) -> list[dict[int, dict]]:
    """Per row group, {leaf column: its ``ColumnMetaData`` fields} read from the footer's Thrift here: pyarrow's
    ``RowGroupMetaData.column`` aborts the process (a C++ exception it does not catch) on some damaged footers,
    so its Python metadata objects are not used for the offsets."""
    fh.seek(file_size - 8)
    length = int.from_bytes(fh.read(4), "little")
    if not 0 < length <= file_size - 12:
        raise ValueError(f"a footer of {length} bytes in a {file_size}-byte file")
    fh.seek(file_size - 8 - length)
    r = _Thrift(fh.read(length))
    groups: list[dict[int, dict]] = []
    for fid, t in r.fields():                            # FileMetaData
        if fid != 4:
            r.skip(t)
            continue
        for _ in range(r.structs(t)):                    # RowGroup
            columns: dict[int, dict] = {}
            for gid, gt in r.fields():
                if gid != 1:
                    r.skip(gt)
                    continue
                for j in range(r.structs(gt)):           # ColumnChunk: its field 3 is the ColumnMetaData
                    meta = {}
                    for cid, ct in r.fields():
                        if cid == 3 and ct == 12:
                            meta = r.struct(1)
                        else:
                            r.skip(ct)
                    if j in leaves:
                        columns[j] = meta
            groups.append(columns)
    return groups


def _page_header(fh, pos: int, file_size: int) -> tuple[dict, int]:
    """The page header at ``pos`` and its length."""
    want = 1 << 16
    while True:
        fh.seek(pos)
        data = fh.read(min(want, max(file_size - pos, 0)))
        reader = _Thrift(data)
        try:
            return reader.struct(), reader.i
        except Truncated:
            if len(data) < want or want >= MAX_PAGE_HEADER:
                raise ValueError("the page header runs past the end of the file" if len(data) < want
                                 else f"a page header over {MAX_PAGE_HEADER} bytes") from None
            want *= 4


def walk_chunk(fh, meta: dict, file_size: int, bound: int, where: str) -> int:
    """The largest page of one column chunk, uncompressed (its dictionary page included: a row's value is at
    most that), from its page headers, read where pyarrow will read them (from the ``ColumnMetaData`` fields:
    5 num_values, 7 total_compressed_size, 9 data_page_offset, 11 dictionary_page_offset); InputError for a
    page over ``bound`` or a header that cannot be read."""
    start, d, length, values = meta.get(9), meta.get(11), meta.get(7), meta.get(5)
    if not all(isinstance(v, int) for v in (start, length, values)):
        raise InputError(f"{where}: no column chunk metadata (offsets and sizes) in the footer")
    if isinstance(d, int) and 0 < d < start:
        start = d
    end = min(start + length, file_size)
    if start < 0 or start >= file_size or length < 0:
        raise InputError(f"{where}: its column chunk lies outside the file (byte {start} of {file_size})")
    pos, seen, largest = start, 0, 0
    while seen < values and pos < end:
        try:
            header, length = _page_header(fh, pos, file_size)
            kind = header.get(1)
            unc, comp = header.get(2), header.get(3)
            if not isinstance(kind, int) or kind not in PAGE_TYPES or not isinstance(unc, int) \
                    or not isinstance(comp, int) or unc < 0 or comp < 0:
                raise ValueError("no page type and sizes in it" if None in (kind, unc, comp)
                                 else f"page type {kind}, sizes {unc} / {comp}")
        except ValueError as e:
            raise InputError(f"{where}: corrupt page header at byte {pos} ({e})") from None
        if unc > bound:
            raise InputError(f"{where}: a {PAGE_TYPES[kind]} page of {unc:,} bytes uncompressed at byte {pos}, over "
                             f"the {bound:,} a page may hold (4 x max_doc_bytes + 1 MiB); refused before decoding")
        if kind in (0, 3):
            sub = header.get(5 if kind == 0 else 8)
            n = sub.get(1) if isinstance(sub, dict) else None
            seen += n if isinstance(n, int) and n > 0 else 0
        largest = max(largest, unc)
        pos += length + comp
    return largest
