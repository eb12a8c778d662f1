"""Settings.from_env: defaults, parsing and errors that name the variable; one SEGGPT_WEIGHTS default for all."""

import argparse
import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from backend.settings import Settings


def test_defaults_from_empty_environment():
    s = Settings.from_env({})
    assert s.label_studio_url is None and s.label_studio_api_key is None
    assert s.device == "auto"
    assert s.model_dir == Path("./model_dir")
    assert s.num_prompts == 4
    assert s.min_region_area == 64
    assert s.allowed_media_hosts == ()
    assert s.local_files_document_root is None


def test_values_are_parsed(tmp_path):
    s = Settings.from_env(
        {
            "LABEL_STUDIO_URL": "http://ls.example:8080/",
            "LABEL_STUDIO_API_KEY": "abc",
            "DEVICE": "CUDA:1",
            "DTYPE": "BF16",
            "MODEL_DIR": str(tmp_path / "m"),
            "BASIC_AUTH_USER": "u",
            "BASIC_AUTH_PASS": "p",
            "LOG_LEVEL": "debug",
            "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
            "ALLOWED_MEDIA_HOSTS": " cdn.example.com, Images.Example.org:8443 ,",
            "REDIS_URL": "redis://localhost:6379/0",
            "NUM_PROMPTS": "8",
            "MIN_REGION_AREA": "0",
            "MAX_IMAGE_BYTES": "2048",
            "MEDIA_TIMEOUT": "2.5",
            "MEDIA_CACHE_MB": "0",
            "POLYGON_MAX_POINTS": "12",
        }
    )
    assert s.label_studio_url == "http://ls.example:8080"
    assert (s.device, s.dtype) == ("cuda:1", "bf16")
    assert s.log_level == "DEBUG"
    assert s.local_files_document_root == tmp_path.resolve()
    assert s.allowed_media_hosts == ("cdn.example.com", "images.example.org:8443")
    assert (s.num_prompts, s.min_region_area, s.max_image_bytes) == (8, 0, 2048)
    assert (s.media_timeout, s.media_cache_mb, s.polygon_max_points) == (2.5, 0, 12)


def test_empty_values_count_as_unset():
    s = Settings.from_env({"NUM_PROMPTS": "", "DEVICE": "  ", "LABEL_STUDIO_URL": ""})
    assert (s.num_prompts, s.device, s.dtype, s.label_studio_url) == (4, "auto", "auto", None)


def test_secrets_stay_out_of_repr():
    s = Settings.from_env({"LABEL_STUDIO_API_KEY": "supersecret", "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "hunter2"})
    assert "supersecret" not in repr(s) and "hunter2" not in repr(s)


@pytest.mark.parametrize(
    "name, value",
    [
        ("LABEL_STUDIO_URL", "ls.example:8080"),
        ("LABEL_STUDIO_URL", "ftp://ls.example"),
        ("LABEL_STUDIO_URL", "http://user:pw@ls.example"),
        ("DEVICE", "tpu"),
        ("DTYPE", "fp16"),
        ("LOG_LEVEL", "chatty"),
        ("LOCAL_FILES_DOCUMENT_ROOT", "/"),
        ("LOCAL_FILES_DOCUMENT_ROOT", "/definitely/not/here"),
        ("ALLOWED_MEDIA_HOSTS", "good.example, http://bad.example/"),
        ("REDIS_URL", "localhost:6379"),
        ("NUM_PROMPTS", "0"),
        ("NUM_PROMPTS", "four"),
        ("MIN_REGION_AREA", "-1"),
        ("MAX_IMAGE_BYTES", "10"),
        ("MEDIA_TIMEOUT", "0"),
        ("MEDIA_TIMEOUT", "nan"),
        ("MEDIA_CACHE_MB", "1.5"),
        ("POLYGON_MAX_POINTS", "2"),
    ],
)
def test_invalid_values_name_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_basic_auth_needs_both_halves():
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        Settings.from_env({"BASIC_AUTH_USER": "u"})


def test_settings_are_frozen():
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.num_prompts = 9  # type: ignore[misc]


def test_torch_threads_setting():
    from backend.settings import Settings

    assert Settings.from_env({}).torch_threads is None
    assert Settings.from_env({"TORCH_THREADS": "1"}).torch_threads == 1
    import pytest
    with pytest.raises(ValueError, match="TORCH_THREADS"):
        Settings.from_env({"TORCH_THREADS": "0"})


# -- SEGGPT_WEIGHTS: one default (the bundled demo) for the server, every command and seggpt_model --------------
def test_weights_default_to_the_bundled_demo():
    """Unset, empty or None all mean the demo model: never "no weights" and never a second env read."""
    from seggpt_model.weights import DEFAULT_WEIGHTS, DEMO_WEIGHTS, resolve_source

    assert DEFAULT_WEIGHTS == "demo"
    for s in (Settings.from_env({}), Settings.from_env({"SEGGPT_WEIGHTS": "  "}), Settings(),
              Settings(seggpt_weights=None)):  # type: ignore[arg-type]
        assert s.seggpt_weights == DEFAULT_WEIGHTS
        assert resolve_source(s.seggpt_weights) == DEMO_WEIGHTS and DEMO_WEIGHTS.is_file()
    assert Settings.from_env({"SEGGPT_WEIGHTS": "BAAI/seggpt-vit-large"}).seggpt_weights == "BAAI/seggpt-vit-large"


def test_seggpt_model_defaults_to_the_demo_too(monkeypatch, tiny_checkpoint):
    """seggpt_model's own default (no source given) is the same: $SEGGPT_WEIGHTS, else the demo."""
    from seggpt_model import load_seggpt
    from seggpt_model.weights import DEMO_WEIGHTS, read_config, resolve_source

    monkeypatch.delenv("SEGGPT_WEIGHTS", raising=False)
    assert resolve_source(None) == resolve_source("") == DEMO_WEIGHTS
    model = load_seggpt()
    assert model.is_demo and model.source == "demo"
    assert read_config().to_dict() == model.config.to_dict()
    monkeypatch.setenv("SEGGPT_WEIGHTS", "")
    assert resolve_source(None) == DEMO_WEIGHTS
    monkeypatch.setenv("SEGGPT_WEIGHTS", str(tiny_checkpoint))
    assert resolve_source(None) == tiny_checkpoint and not load_seggpt().is_demo


def _is_os_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name)
            and node.value.id == "os")


def environment_reads(source: str) -> list[int]:
    """Lines that read one variable of the environment: ``os.environ.get(...)``, ``os.environ[...]``,
    ``... in os.environ``, ``os.getenv(...)``. Copying it whole for a child process is no read."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                (node.func.attr in ("get", "pop", "setdefault") and _is_os_environ(node.func.value))
                or (node.func.attr == "getenv" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "os")):
            lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_os_environ(node.value):
            lines.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(_is_os_environ(c) for c in node.comparators):
            lines.append(node.lineno)
    return lines


def test_command_modules_read_no_environment_variable_of_their_own():
    """The commands get the settings the CLI read once (jobs in a work horse: Settings.from_env, the same way);
    none reads a variable, or a default, on its own. cli.py, the dispatcher, is left to its own tests."""
    import backend

    assert environment_reads("import os\nos.environ.get('X'); os.getenv('Y'); 'Z' in os.environ; os.environ['W']"
                             "\nenv = {**os.environ}") == [2, 2, 2, 2]  # the probe finds each kind of read
    readers = {path.name: lines for path in sorted(Path(backend.__file__).parent.glob("*.py"))
               if path.name not in ("settings.py", "cli.py") and (lines := environment_reads(path.read_text()))}
    assert not readers, readers


LABEL_CONFIG = ('<View><Image name="image" value="$image"/>'
                '<BrushLabels name="tag" toName="image"><Label value="A"/></BrushLabels></View>')


def _backend_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``seggpt-backend ARGS`` with an empty environment (OMP_NUM_THREADS aside): defaults only."""
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=cwd, env={"OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def test_commands_with_an_empty_environment_use_the_demo_and_say_so(tmp_path):
    """Inline tune and a worker's job build the backend from the default settings: the demo, with its WARNING.

    MODEL_DIR defaults to ./model_dir (the embedded Redis lives there), so each run starts in tmp_path.
    """
    from backend.model import DEMO_WARNING

    (tmp_path / "config.xml").write_text(LABEL_CONFIG)
    tune = ("tune", "--project", "1", "--label-config", "config.xml")
    queued = _backend_cli(tmp_path, *tune, "--no-follow")
    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.strip()
    worker = _backend_cli(tmp_path, "worker", "--burst")
    assert worker.returncode == 0, worker.stderr
    assert worker.stderr.count(DEMO_WARNING) == 1 and " WARNING backend.model: " in worker.stderr
    assert f"job {job_id} failed: nothing to tune" in worker.stderr  # the job ran on the demo model, then refused

    inline = _backend_cli(tmp_path, *tune, "--inline")
    assert inline.returncode == 1  # nothing to tune yet; the weights were resolved before that
    assert inline.stderr.count(DEMO_WARNING) == 1, inline.stderr
    assert "failed: nothing to tune" in inline.stdout and "no weights" not in inline.stdout + inline.stderr


def test_pack_commands_default_to_the_demo_and_say_so(tmp_path, monkeypatch, caplog):
    """export (and import) tie a pack to the configured model: with nothing configured, the demo, announced."""
    from backend.model import weights_fingerprint
    from backend.pack_commands import _export
    from backend.store import model_version

    monkeypatch.chdir(tmp_path)  # MODEL_DIR's default, ./model_dir, holds the embedded Redis
    args = argparse.Namespace(project="1", out=tmp_path / "pack.zip")
    assert _export(Settings.from_env({}), args) == 0
    assert "SEGGPT_WEIGHTS=demo (the default when unset)" in caplog.text
    with zipfile.ZipFile(tmp_path / "pack.zip") as pack:
        manifest = json.loads(pack.read("manifest.json"))
    assert manifest["model"]["fingerprint"] == weights_fingerprint("demo")
    assert manifest["model_version"] == model_version(weights_fingerprint("demo"), 0)
