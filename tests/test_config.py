"""Configuration: validation, defaults, path resolution and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from opmri_node.config import (
    DEFAULT_CONFIG_YAML,
    EMBEDDED_SOURCE,
    ConfigError,
    NodeConfig,
    load_config,
    parse_config,
    validate_ae_title,
)

VALID = """\
node:
  ae_title: OPMRI
  bind: 0.0.0.0
  port: 11112
  data_dir: var
  study_stable_seconds: 10
peers:
  pacs:
    ae_title: ORTHANC
    host: 127.0.0.1
    port: 4242
    may_send: true
    results: true
queue:
  broker: null
pipeline:
  device: auto
  models_dir: models
"""


def write(tmp_path: Path, text: str, name: str = "node.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_design_example_loads_with_contract_keys(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    assert config.node.ae_title == "OPMRI"
    assert config.node.port == 11112
    assert config.node.study_stable_seconds == 10
    assert config.peers["pacs"].ae_title == "ORTHANC"
    assert config.peers["pacs"].may_send and config.peers["pacs"].results
    assert not config.peers["pacs"].check_host
    assert config.queue.broker is None
    assert config.pipeline.device == "auto"
    retry = config.export.retry
    assert (retry.initial_delay_s, retry.factor, retry.max_delay_s, retry.max_attempts) == (
        30,
        2,
        600,
        10,
    )


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    config = load_config(write(sub, VALID))
    assert config.node.data_dir == (sub / "var").resolve()
    assert config.pipeline.models_dir == (sub / "models").resolve()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    text = VALID.replace("data_dir: var", f"data_dir: {tmp_path / 'elsewhere'}")
    assert load_config(write(tmp_path, text)).node.data_dir == tmp_path / "elsewhere"


def test_embedded_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OPMRI_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.node.ae_title == "OPMRI"
    assert config.node.port == 11112
    assert config.node.data_dir == tmp_path.resolve() / "var"
    assert config.peers == {}
    # printable and re-readable
    again = parse_config(config.to_yaml(), source="printed", base_dir=tmp_path)
    assert again == config
    assert "ae_title: OPMRI" in DEFAULT_CONFIG_YAML


def test_environment_variable_names_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, VALID.replace("port: 11112", "port: 11999"))
    monkeypatch.setenv("OPMRI_CONFIG", str(path))
    assert load_config(None).node.port == 11999
    monkeypatch.setenv("OPMRI_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"missing\.yaml: \(top level\): file not found"):
        load_config(None)


def test_empty_file_means_all_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.node.ae_title == "OPMRI" and config.peers == {}
    assert config.node.data_dir == tmp_path.resolve() / "var"


@pytest.mark.parametrize(
    ("text", "key", "reason", "line"),
    [
        (VALID.replace("ae_title: OPMRI", "ae_title: OPMRI_NODE_TOO_LONG1"), "node.ae_title",
         "at most 16 characters", 2),
        (VALID.replace("ae_title: OPMRI", "ae_title: 'A\\\\B'"), "node.ae_title",
         "other than backslash", 2),
        (VALID.replace("ae_title: OPMRI", "ae_title: '   '"), "node.ae_title",
         "must not be empty", 2),
        (VALID.replace("ae_title: ORTHANC", "ae_title: 'ORTH\tANC'"), "peers.pacs.ae_title",
         "printable ASCII", 9),
        (VALID.replace("port: 11112", "port: 70000"), "node.port", "less than or equal", 4),
        (VALID.replace("port: 4242", "port: 0"), "peers.pacs.port", "greater than or equal", 11),
        (VALID.replace("data_dir: var", "data_dir: var\n  datadir: typo"), "node.datadir",
         "unknown key", 6),
        (VALID.replace("  pacs:", "  'bad name':"), "peers",
         "must start with a letter or digit", 7),
        (VALID.replace("    host: 127.0.0.1\n", ""), "peers.pacs.host", "required key is missing",
         8),
        (VALID.replace("bind: 0.0.0.0", "bind: 'not a host!'"), "node.bind",
         "neither an IP address nor a host name", 3),
        (VALID.replace("broker: null", "broker: amqp://x"), "queue.broker", "redis://", 15),
        (VALID.replace("device: auto", "device: tpu"), "pipeline.device", "auto", 17),
        (VALID.replace("study_stable_seconds: 10", "study_stable_seconds: -1"),
         "node.study_stable_seconds", "greater than 0", 6),
        (VALID + "extras: 1\n", "extras", "unknown key", 19),
    ],
)
def test_bad_values_name_file_line_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str, line: int | None
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    issues = [issue for issue in info.value.issues if issue.key == key]
    assert issues, str(info.value)
    assert reason in issues[0].reason
    assert issues[0].source == str(path)
    assert issues[0].line == line
    where = f"{path}:{line}" if line else str(path)
    assert f"{where}: {key}: " in str(info.value)


def test_every_problem_is_reported(tmp_path: Path) -> None:
    text = VALID.replace("port: 11112", "port: -1").replace("ae_title: ORTHANC", "ae_title: ''")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert {issue.key for issue in info.value.issues} == {"node.port", "peers.pacs.ae_title"}


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "node:\n  ae_title: [unclosed\n  port: 1\n"))
    (issue,) = info.value.issues
    assert "not valid YAML" in issue.reason
    assert issue.line is not None


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping of sections, not list"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("OPMRI", "OPMRI"), ("  PACS 1 ", "PACS 1"), ("A" * 16, "A" * 16), ("a-b_c.d", "a-b_c.d")],
)
def test_valid_ae_titles(value: str, expected: str) -> None:
    assert validate_ae_title(value) == expected


@pytest.mark.parametrize("value", ["", "    ", "A" * 17, "BACK\\SLASH", "TAB\tX", "ÄE", "LF\n"])
def test_invalid_ae_titles(value: str) -> None:
    with pytest.raises(ValueError):
        validate_ae_title(value)


def test_peer_lookup_names_known_peers(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    assert config.peer("pacs").port == 4242
    with pytest.raises(KeyError, match=r"no peer named 'ris'.*peers: pacs"):
        config.peer("ris")


def test_models_reject_unknown_keys_everywhere() -> None:
    for section in ("node", "queue", "export"):
        with pytest.raises(ConfigError, match=f"{section}.bogus: unknown key"):
            parse_config(f"{section}:\n  bogus: 1\n", source="inline", base_dir=Path("."))
    assert NodeConfig.model_config.get("extra") == "forbid"
    assert EMBEDDED_SOURCE == "<embedded default>"


def test_example_config_is_valid() -> None:
    from tests.node_fixtures import REPO_ROOT

    path = REPO_ROOT / "config" / "node.example.yaml"
    config = load_config(path)
    assert config.node.data_dir == (REPO_ROOT / "var").resolve()
    assert config.peers["mri-scanner"].check_host
    assert config.peers["pacs"].results
