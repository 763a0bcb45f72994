"""Image-folder datasets, laid out as torchvision's `ImageFolder` reads them:

    train/<class>/<image>    test/<class>/<image>    (val/ is taken for test/)

in a folder or in a `.tar`, `.tar.gz` or `.zip` of one (also one folder down, as archives often
wrap their contents). Class names are the class folders' names in sorted order; any format
Pillow decodes; one image size per dataset.

The first read decodes every file once, in parallel over the CPU cores, into a uint8 cache
(`$XDG_CACHE_HOME/jaxcam/datasets/`, default `~/.cache/jaxcam/datasets/`) keyed by the
source's path and the size and modification time of its files, so a changed source is decoded
again; later reads load the cache.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from jaxcam.errors import DataError

SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
_CACHE_VERSION = 1  # bump when the cache's contents change meaning


def cache_folder() -> Path:
    """Where decoded datasets are kept: `$XDG_CACHE_HOME/jaxcam/datasets` (default `~/.cache/...`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxcam" / "datasets"


def neither_layout(where: str | os.PathLike) -> DataError:
    """The error for a data path that holds no dataset jaxcam reads."""
    return DataError(f"{str(where)!r} is neither an official CIFAR-10 copy (cifar-10-python.tar.gz, a "
                     "cifar-10-batches-py/ folder or its batch files) nor an image-folder dataset "
                     "(train/<class>/<image> and test/<class>/<image>).")


def is_image_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder with train/ and test/ (or val/) folders, itself or one folder
    down, or an archive whose first file lies at <split>/<class>/<file>."""
    path = Path(path)
    if path.is_dir():
        return _root_of(path) is not None
    if path.suffix == ".zip" or not tarfile.is_tarfile(path):
        return zipfile.is_zipfile(path)
    with tarfile.open(path, "r:*") as tar:  # the official archive's first files are its batch files
        first = next((m for m in _tar_members(tar) if m.isfile()), None)
    return first is not None and _split_of(PurePosixPath(first.name)) is not None


def load_image_folder(path: str | os.PathLike, *, log: Callable[[str], None] = print):
    """The image-folder dataset at `path` as a `data.Cifar10` (the dataset type), from the cache
    when the source is unchanged; DataError with one sentence for a bad layout or file."""
    from jaxcam.data import Cifar10  # the dataset type; data.py reads image folders through here

    path = Path(path).expanduser().absolute()
    source = _FolderSource(path) if path.is_dir() else _ArchiveSource(path)
    cached = cache_folder() / f"{path.name}-{source.key()}.npz"
    if cached.is_file():
        with np.load(cached) as arrays:
            return Cifar10(arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                           arrays["test_labels"], tuple(str(name) for name in arrays["class_names"]))
    files, class_names = _layout(source.names(), str(path))
    images = _decode_all(source, [name for name, _, _ in files], str(path), log)
    splits = {}
    for split in SPLIT_FOLDERS:
        chosen = [i for i, (_, s, _) in enumerate(files) if s == split]
        splits[split] = (images[chosen], np.array([files[i][2] for i in chosen], np.int32))
    dataset = Cifar10(*splits["train"], *splits["test"], class_names)
    _write_cache(cached, dataset)
    return dataset


def _split_of(name: PurePosixPath) -> str | None:
    """The split a file at .../<split>/<class>/<file> belongs to, or None."""
    parts = name.parts
    if len(parts) < 3:
        return None
    return next((split for split, folders in SPLIT_FOLDERS.items() if parts[-3] in folders), None)


def _root_of(folder: Path) -> Path | None:
    """`folder`, or its one subfolder, when it holds train/ and test/ (or val/); else None."""
    def holds_splits(candidate: Path) -> bool:
        return all(any((candidate / f).is_dir() for f in folders) for folders in SPLIT_FOLDERS.values())

    if holds_splits(folder):
        return folder
    children = [child for child in folder.iterdir() if child.is_dir() and not child.name.startswith(".")]
    return children[0] if len(children) == 1 and holds_splits(children[0]) else None


def _layout(names: list[tuple[str, bool]], where: str) -> tuple[list[tuple[str, str, int]], tuple[str, ...]]:
    """(name, split, label) for every image file, sorted by split, class and name, and the class
    names, from the source's (name, is_folder) entries; DataError for a bad layout."""
    classes: dict[str, set[str]] = {split: set() for split in SPLIT_FOLDERS}
    found: list[tuple[str, str, str]] = []
    prefixes = set()
    for name, is_folder in names:
        parts = PurePosixPath(name).parts
        if any(part.startswith(".") or part == "__MACOSX" for part in parts):
            continue  # .DS_Store, AppleDouble files, hidden folders
        # A class folder is <split>/<class>; a file is <split>/<class>/<file>.
        depth = 2 if is_folder else 3
        split = _split_of(PurePosixPath(*parts, "x")) if is_folder else _split_of(PurePosixPath(name))
        if split is None or len(parts) < depth:
            continue
        prefixes.add(parts[:-depth])
        classes[split].add(parts[-depth + 1])
        if not is_folder:
            found.append((name, split, parts[-2]))
    if len(prefixes) > 1 or not all(classes.values()):
        raise neither_layout(where)
    if classes["train"] != classes["test"]:
        only_train, only_test = sorted(classes["train"] - classes["test"]), sorted(classes["test"] - classes["train"])
        raise DataError(f"The class folders of train/ and test/ in {where!r} differ: "
                        + "; ".join(f"only {split}/ has {', '.join(names)}" for split, names in
                                    (("train", only_train), ("test", only_test)) if names) + ".")
    class_names = tuple(sorted(classes["train"]))
    for split in SPLIT_FOLDERS:
        filled = {label for _, s, label in found if s == split}
        empty = [name for name in class_names if name not in filled]
        if empty:
            raise DataError(f"The class folder {split}/{empty[0]} in {where!r} holds no images.")
    index = {name: i for i, name in enumerate(class_names)}
    files = sorted(((name, split, index[label]) for name, split, label in found),
                   key=lambda f: (f[1] != "train", f[2], f[0]))
    return files, class_names


def _decode_all(source, names: list[str], where: str, log) -> np.ndarray:
    """Every file decoded to uint8 RGB (N, H, W, 3), in parallel with a progress bar."""
    from PIL import Image, UnidentifiedImageError

    def decode(name: str) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(source.read(name))) as img:
                return np.asarray(img.convert("RGB"), np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{name!r} in {where!r} is not an image Pillow can read ({type(e).__name__}).") from None

    log(f"Decoding the {len(names)} images of {where} once, into {cache_folder()}.")
    images: list[np.ndarray] = []
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # Pillow decodes without the GIL
        for image in tqdm(pool.map(decode, names, chunksize=256), total=len(names), desc="Decoding", unit="img"):
            if images and image.shape != images[0].shape:
                first, other = names[0], names[len(images)]
                raise DataError(f"The images of {where!r} differ in size: {first!r} is {_size(images[0])} but "
                                f"{other!r} is {_size(image)}; give one size per dataset.")
            images.append(image)
    return np.stack(images)


def _size(image: np.ndarray) -> str:
    return f"{image.shape[1]}x{image.shape[0]}"


def _write_cache(path: Path, dataset) -> None:
    """Save the decoded arrays (atomically: a stop mid-write leaves no half cache); an unwritable
    cache folder only costs decoding again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial.npz")
        np.savez(partial, train_images=dataset.train_images, train_labels=dataset.train_labels,
                 test_images=dataset.test_images, test_labels=dataset.test_labels,
                 class_names=np.array(dataset.class_names))
        os.replace(partial, path)
    except OSError:
        pass


def _key(entries: Iterator[tuple[str, int, int]], path: Path) -> str:
    """A digest of the source's path and its files' (name, size, mtime in ns)."""
    digest = hashlib.sha256(f"{_CACHE_VERSION}\0{path}".encode())
    for name, size, mtime in entries:
        digest.update(f"\0{name}\0{size}\0{mtime}".encode())
    return digest.hexdigest()[:20]


class _FolderSource:
    """The files of a dataset folder, read where they lie."""

    def __init__(self, path: Path):
        self.path = path

    def names(self) -> list[tuple[str, bool]]:
        found = []
        for folder, subfolders, files in os.walk(self.path):
            relative = Path(folder).relative_to(self.path)
            found += [((relative / name).as_posix(), True) for name in subfolders]
            found += [((relative / name).as_posix(), False) for name in files]
        return found

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def key(self) -> str:
        def entries():
            for name, is_folder in sorted(self.names()):
                if not is_folder:
                    stat = (self.path / name).stat()
                    yield name, stat.st_size, stat.st_mtime_ns
        return _key(entries(), self.path)


class _ArchiveSource:
    """The files of a .tar(.gz) or .zip, read into memory in one pass (a .tar.gz reads in order)."""

    def __init__(self, path: Path):
        self.path = path
        self._contents: dict[str, bytes] | None = None

    def key(self) -> str:
        stat = self.path.stat()
        return _key(iter([("", stat.st_size, stat.st_mtime_ns)]), self.path)

    def names(self) -> list[tuple[str, bool]]:
        try:
            if zipfile.is_zipfile(self.path):
                with zipfile.ZipFile(self.path) as archive:
                    self._contents = {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}
                    folders = [i.filename.rstrip("/") for i in archive.infolist() if i.is_dir()]
            else:
                with tarfile.open(self.path, "r:*") as tar:
                    members = list(_tar_members(tar))
                    self._contents = {m.name: tar.extractfile(m).read() for m in members if m.isfile()}
                    folders = [m.name for m in members if m.isdir()]
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(f"{str(self.path)!r} is not a readable .tar, .tar.gz or .zip archive "
                            f"({type(e).__name__}).") from None
        return [(name, False) for name in self._contents] + [(name, True) for name in folders]

    def read(self, name: str) -> bytes:
        return self._contents[name]


def _tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        member.name = member.name.removeprefix("./")
        yield member
