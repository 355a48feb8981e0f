"""A folder of training artifacts as one archive, and back, for the hub to serve them to devices.

An uncompressed POSIX tar, written deterministically (sorted names, zero times and owners) so the same
build always gives the same bytes and sha256. Reading trusts nothing: only regular files with plain
relative names are extracted, by hand and never with ``extractall``, so a hostile archive cannot write
outside the target folder (``..``, absolute names, links, devices), and every file must then match the
sha256 the manifest lists. Standard library only, so a device needs nothing to read it.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from ffm_edge.errors import OrtArtifactError

__all__ = ["pack_folder", "safe_member_name", "unpack_archive"]

_BLOCK = 1 << 20


def pack_folder(folder: str | Path) -> tuple[bytes, int]:
    """Every regular file under ``folder`` in one tar; returns the bytes and the number of files."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    if not files:
        raise OrtArtifactError(f"no files to archive in {folder}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue(), len(files)


def safe_member_name(name: str) -> str:
    """``name`` if it is a plain relative path inside the archive; :class:`OrtArtifactError` otherwise."""
    path = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
        or ":" in path.parts[0]
    ):
        raise OrtArtifactError(f"unsafe name in the artifact archive: {name!r}")
    return name


def unpack_archive(data: bytes, dest: str | Path, *, max_files: int = 1024) -> list[str]:
    """Write the regular files of the tar ``data`` under ``dest`` (created); returns their names.

    Raises :class:`OrtArtifactError` for an unreadable archive, an unsafe or duplicate name, or anything
    but regular files and folders. Does not check hashes: the manifest does that afterwards.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    names: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isdir():
                    safe_member_name(member.name.rstrip("/"))
                    continue
                if not member.isfile():
                    raise OrtArtifactError(f"the artifact archive holds a non-file member {member.name!r}")
                name = safe_member_name(member.name)
                if name in names:
                    raise OrtArtifactError(f"the artifact archive holds {name!r} twice")
                if len(names) >= max_files:
                    raise OrtArtifactError(f"the artifact archive holds more than {max_files} files")
                target = (root / name).resolve()
                if not target.is_relative_to(root):
                    raise OrtArtifactError(f"unsafe name in the artifact archive: {name!r}")
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - isfile() members always have data
                    raise OrtArtifactError(f"cannot read {name!r} from the artifact archive")
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    shutil.copyfileobj(source, out, _BLOCK)
                names.append(name)
    except tarfile.TarError as exc:
        raise OrtArtifactError(f"the artifact archive is not a readable tar: {exc}") from exc
    if not names:
        raise OrtArtifactError("the artifact archive holds no files")
    return names
