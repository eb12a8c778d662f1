"""Settings.from_env: defaults, parsing and errors that name the variable."""

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
