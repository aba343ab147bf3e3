"""Config loading, overrides and the one-line errors (no Ray)."""

from __future__ import annotations

import json

import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from pipelines.cli import main
from pipelines.config import Config, ConfigError, load_config, valid_keys

REQUIRED_KEYS = ["data.source", "train.epochs", "train.batch_size", "train.num_workers", "train.lr", "train.seed",
                 "loss.name", "sampler.name", "sampler.k", "sampler.m",
                 "sampler.restart_prob", "refresh.every_epochs", "tracking.uri", "tracking.experiment"]


def test_every_documented_key_exists():
    keys = valid_keys()
    for key in REQUIRED_KEYS:
        assert key in keys


def test_yaml_and_overrides_are_typed_and_frozen(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\nsampler:\n  name: uniform\n")
    config = load_config(path, ["train.lr=0.01", "loss.infonce.temperature=0.5", "refresh.mode=sync"])
    assert config.train.epochs == 7 and config.sampler.name == "uniform"
    assert config.train.lr == 0.01 and isinstance(config.train.lr, float)
    assert config.refresh.mode == "sync"
    with pytest.raises(pydantic.ValidationError):
        config.train.epochs = 3  # frozen after validation
    flat = config.flat()
    assert flat["train.epochs"] == 7 and flat["tracking.uri"] is None
    assert flat["loss.infonce.temperature"] == 0.5  # a loss's settings are params too
    assert set(flat) == set(valid_keys()) | {"loss.infonce.temperature"}


def test_default_config_validates():
    assert isinstance(load_config("configs/digits.yaml"), Config)
    assert isinstance(load_config("configs/smoke.yaml"), Config)


@pytest.mark.parametrize("override, field, fragment", [
    ("train.batch_size=1", "train.batch_size", "greater than or equal to 2"),
    ("loss.infonce.temperature=0", "loss.infonce.temperature", "> 0"),
    ("loss.infonce.temperature=-1", "loss.infonce.temperature", "> 0"),
    ("loss.sscl.tau_plus=2", "loss.sscl.tau_plus", "[0.0, 1.0)"),
    ("loss.mveb.ema_base=1.5", "loss.mveb.ema_base", "less than 1"),
    ("loss.soft_infonce.targets=cutmix", "loss.soft_infonce.targets", "'smoothing' or 'mixup'"),
    ("sampler.restart_prob=1", "sampler.restart_prob", "[0, 1)"),
    ("sampler.restart_prob=-0.1", "sampler.restart_prob", "[0, 1)"),
    ("train.epochs=abc", "train.epochs", "integer"),
    ("data.source=builtin:mnist", "data.source", "builtin:digits"),
    ("train.num_workers=4", "train.num_workers", "CPUs Ray will have"),
    ("sampler.name=bfs", "sampler.name", "'rwr'"),
])
def test_bad_values_name_field_value_and_rule(override, field, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("configs/digits.yaml", [override, "ray.num_cpus=2"])
    message = str(err.value)
    assert field in message and fragment in message
    assert override.split("=", 1)[1] in message


def test_k_must_be_below_dataset_size():
    with pytest.raises(ConfigError, match=r"sampler.k = 1500 .*training split .*1437"):
        load_config("configs/digits.yaml", ["sampler.k=1500", "sampler.m=2000"])


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*'train.epochs'"):
        load_config("configs/digits.yaml", ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"'sampler.restart_prob'"):
        load_config("configs/digits.yaml", ["sampler.restart_p=0.3"])


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config("configs/digits.yaml", ["train.epochs"])


@pytest.mark.parametrize("override, fragment", [
    ("train.batch_size=1", "train.batch_size"),
    ("sampler.restart_prob=1.5", "sampler.restart_prob"),
    ("nonsense.key=1", "unknown config key"),
])
def test_cli_validate_prints_one_line_without_traceback(override, fragment, capsys):
    assert main(["validate", "configs/digits.yaml", "--set", override]) == 2  # no exception escapes
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_cli_validate_accepts_good_config_without_importing_ray():
    # A process of its own: whether Ray was imported is a property of a fresh interpreter.
    probe = subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", "configs/smoke.yaml"],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert probe.returncode == 0, probe.stderr
    assert "train.epochs = 3" in probe.stdout
    imported = {line.split("|")[-1].strip() for line in probe.stderr.splitlines() if line.startswith("import time:")}
    assert "pipelines.config" in imported and "ray" not in imported


def test_readme_documents_every_key_with_its_default():
    from pathlib import Path

    from pipelines.config import reference_table

    from pipelines.config import loss_reference_table

    readme = Path("README.md").read_text()
    for row in reference_table().splitlines()[2:]:
        assert row in readme, f"README configuration table is stale: {row}"
    for row in loss_reference_table().splitlines()[2:]:
        assert row in readme, f"README loss table is stale: {row}"


@pytest.mark.parametrize("overrides, pattern", [
    (["loss.temperature=0.1"], r"unknown config key 'loss.temperature'; .*e.g. loss.infonce.temperature"),
    (["loss.infonse.temperature=0.1"], r"unknown config key 'loss.infonse'; did you mean 'loss.infonce'\?"),
    (["loss.sscl.tau_pluss=0.1"], r"unknown config key 'loss.sscl.tau_pluss'; did you mean 'loss.sscl.tau_plus'\?"),
    (["loss.mveb.temperature=0.1"], r"unknown config key 'loss.mveb.temperature'; valid: lam, eta"),
    (["loss.mveb=3"], r"loss.mveb = 3: must be a mapping"),
    (["loss.name=clip"], r"loss.name = 'clip' trains two towers on paired data: data.source must be one of "
                         r"builtin:digits_pairs, generated:gaussian, got 'builtin:digits'"),
    (["data.source=generated:gaussian"], r"data.source = 'generated:gaussian' is paired data .* got 'infonce'"),
    (["data.source=generated:gaussian", "loss.name=soft_infonce"], r"paired data"),
    (["data.dim=4"], r"data.dim applies to generated sources \(generated:gaussian\), not to 'builtin:digits'"),
    (["loss.soft_infonce.noise=[1, 1]", "loss.soft_infonce.noise_from=uniform"], r"give one"),
    (["train.seed=-1"], r"^train.seed = -1: must be greater than or equal to 0$"),
    (["data.split_seed=-3"], r"^data.split_seed = -3: must be greater than or equal to 0$"),
    (["tracking.uri=mlflow.db"], r"^tracking.uri = 'mlflow.db': must be a tracking URI such as sqlite:///"),
    (["tracking.uri=file:///tmp/mlruns"], r"no plain-path or file: store"),
    (["tracking.run_name=../elsewhere"], r"^tracking.run_name = '../elsewhere': must be a plain name"),
    (["tracking.run_name=a/b"], r"must be a plain name"),
    (["loss.name=soft_infonce", "loss.soft_infonce.noise=[0.5, 0.5]"],
     r"^loss.soft_infonce.noise has 2 entries: data.source = 'builtin:digits' has 10 classes"),
    (["loss.soft_infonce.noise=abc"], r"^loss.soft_infonce.noise = 'abc': must be a list of class probabilities"),
    (["loss.mveb.ema_base=1"], r"^loss.mveb.ema_base = 1: must be less than 1$"),
    (["train=3"], r"^train = 3: must be a section \(a mapping\) of train.epochs, "),
    (["trian.epochs=3"], r"^unknown config key 'trian'; did you mean section 'train'\?$"),
    (["optimizer.lr=0.1"], r"^unknown config key 'optimizer'; sections: data, model, train, "),
    (["train.foo=1"], r"^unknown config key 'train.foo'; train keys: epochs, batch_size, "),
    (["loss.nmae=mveb"], r"did you mean 'loss.name'\?$"),
    (["loss.mveb.ema=0.9"], r"did you mean 'loss.mveb.ema_base'\?$"),
    (["train.use_gpu=true"], r"^train.use_gpu = true \(2 workers x 1\): 2 GPUs wanted, a local Ray will have 0"),
    (["refresh.num_gpus=0.5"], r"^refresh.num_gpus = 0.5 x 1 actors: 0.5 GPUs wanted"),
])
def test_bad_sections_and_values_are_refused_before_ray(overrides, pattern, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever machine runs the tests
    with pytest.raises(ConfigError, match=pattern):
        load_config("configs/smoke.yaml", overrides)


def test_every_loss_section_is_validated_even_when_not_selected():
    # a sweep over loss.name must not discover a bad setting of its third variant after two runs
    with pytest.raises(ConfigError, match=r"loss.mveb.lam = -1"):
        load_config("configs/smoke.yaml", ["loss.name=infonce", "loss.mveb.lam=-1"])


def test_loss_accessors_and_kinds():
    config = load_config("configs/smoke.yaml", ["loss.name=mveb", "loss.mveb.ema_base=0.9"])
    assert config.loss.kind == "ema"
    assert config.loss.hyperparameters() == {"lam": 0.01}  # ema_base is a training option
    assert config.loss.training().ema_base == 0.9
    assert config.loss.hyperparameters("sscl")["n_hard"] == 64
    bimodal = load_config("configs/bimodal_gaussian.yaml", ["loss.name=joint"])
    assert bimodal.loss.kind == "bimodal" and bimodal.data.source_params() == {"num_samples": 4000, "dim": 8, "seed": 0}
    assert load_config("configs/smoke.yaml", ["loss.name=soft_infonce"]).loss.kind == "classifier"
    assert load_config("configs/smoke.yaml").loss.training() is None  # infonce has no training options


def test_generated_source_size_bounds_the_batch():
    with pytest.raises(ConfigError, match=r"train.batch_size = 512 exceeds the training split of generated:gaussian \(80 samples\)"):
        load_config("configs/bimodal_gaussian.yaml", ["data.num_samples=100", "train.batch_size=512"])


def test_a_bad_tracking_uri_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlruns")
    with pytest.raises(ConfigError, match=r"^\$MLFLOW_TRACKING_URI = 'mlruns': must be a tracking URI"):
        load_config("configs/smoke.yaml")
    assert load_config("configs/smoke.yaml", ["tracking.uri=sqlite:///m.db"]).tracking.uri == "sqlite:///m.db"


def test_gpu_requests_are_checked_against_the_gpus_ray_will_have():
    from pipelines.config import check_gpus, train_worker_gpus

    config = Config.model_validate({"train": {"use_gpu": True, "num_workers": 2}, "refresh": {"num_gpus": 0.25}})
    # a fractional embedding actor shares a training GPU: each worker asks for 0.75
    assert train_worker_gpus(config) == 0.75
    check_gpus(config, 1.75)  # fits exactly
    with pytest.raises(ConfigError, match=r"workers x 0.75\) and refresh.num_gpus = 0.25 x 1 actors: 1.75 GPUs "
                                          r"wanted, a local Ray will have 1.5"):
        check_gpus(config, 1.5)
    one = Config.model_validate({"train": {"use_gpu": True, "num_workers": 1}, "refresh": {"num_gpus": 0.25}})
    check_gpus(one, 1)  # one GPU trains and embeds
    whole = Config.model_validate({"train": {"use_gpu": True, "num_workers": 1}, "refresh": {"num_gpus": 1}})
    assert train_worker_gpus(whole) == 1.0
    with pytest.raises(ConfigError, match="2 GPUs wanted"):
        check_gpus(whole, 1)  # a whole GPU for the embedding pool is a GPU of its own
    assert train_worker_gpus(Config.model_validate({"refresh": {"num_gpus": 0.5}})) == 0.0


@pytest.mark.parametrize("text, pattern", [
    ("train:\n  epochs: 3\ntrain:\n  lr: 0.1\n", r"line 3, column 1: key 'train' given twice in one section \(also on line 1\)"),
    ("train:\n  epochs: 3\n  epochs: 4\n", r"line 3, column 3: key 'epochs' given twice"),
    ("train: [1, 2\n", r"is not valid YAML: line 2, column 1: expected ',' or ']'"),
    (b"\xff\xfetrain: 1\n", r"is not UTF-8 text \(byte 0"),
])
def test_config_files_that_cannot_be_read_as_written(tmp_path, text, pattern):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_cli_validate_prints_the_selected_loss_with_defaults_and_the_resolved_uri(capsys):
    assert main(["validate", "configs/smoke.yaml", "--set", "loss.name=mveb", "--set", "tracking.uri=sqlite:///rel.db"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  loss.mveb.lam = 0.01" in lines and "  loss.mveb.ema_base = 0.99" in lines  # from the file
    from trainers.losses import LOSSES

    for key, default in LOSSES["mveb"].params().items():  # the defaults not given in the file too
        if key != "lam":
            assert f"  loss.mveb.{key} = {default}" in lines, key
    assert f"  tracking.uri = sqlite:///{Path.cwd() / 'rel.db'}" in lines


def test_an_empty_section_means_its_defaults(tmp_path):
    path = tmp_path / "empty_sections.yaml"
    path.write_text("train:\nloss:\n  name: mveb\n  mveb:\n")
    config = load_config(path)
    assert config.train == Config().train and config.loss.name == "mveb" and config.loss.section() == {}


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("hardbatch ")


@pytest.mark.parametrize("overrides, env_uri, pattern", [
    (["storage.path=hardbatch_results", "tracking.uri=http://127.0.0.1:5000"], None,
     r"^storage.path = 'hardbatch_results' is relative, and on a cluster .* deleted with the job: give an absolute path"),
    (["storage.path=/mnt/shared/results"], None,
     r"^tracking.uri is not set \(nor \$MLFLOW_TRACKING_URI\): .* log to an MLflow server"),
    (["storage.path=/mnt/shared/results", "tracking.uri=sqlite:///mlflow.db"], None,
     r"^tracking.uri = 'sqlite:///mlflow.db' is a relative sqlite path"),
    (["storage.path=/mnt/shared/results"], "sqlite:///runs.db", r"^tracking.uri = 'sqlite:///runs.db' is a relative"),
])
def test_cluster_paths_that_the_job_would_lose_are_refused_before_connecting(overrides, env_uri, pattern, monkeypatch):
    # `ray job submit --working-dir` runs the driver in a copy of the directory that Ray deletes with the job
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # nothing listens there: validate must not connect
    if env_uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=pattern):
        load_config("configs/smoke.yaml", overrides)


def test_cluster_paths_that_every_node_can_reach_are_accepted(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    load_config("configs/smoke.yaml", ["storage.path=/mnt/shared/results"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    load_config("configs/smoke.yaml", ["storage.path=/mnt/shared/results", "tracking.uri=sqlite:////mnt/shared/m.db"])


def test_connected_cluster_checks_count_nodes_and_what_the_autoscaler_can_add():
    from pipelines.config import check_cluster, reachable_resources

    gpu = Config.model_validate({"train": {"use_gpu": True, "num_workers": 2}})
    sqlite, server = "sqlite:////mnt/shared/m.db", "http://10.0.0.1:5000"
    check_cluster(gpu, sqlite, nodes=1, can_add_nodes=False, reachable={"CPU": 8, "GPU": 2})  # one node: one file
    for nodes, grows in ((3, False), (1, True)):
        with pytest.raises(ConfigError, match=r"^tracking.uri = 'sqlite:////mnt/shared/m.db': a sqlite file lives on one "
                                              r"node, .* log to an MLflow server"):
            check_cluster(gpu, sqlite, nodes=nodes, can_add_nodes=grows, reachable={"CPU": 8, "GPU": 2})
    # a cluster scaled to zero GPU nodes whose autoscaler can add 4 of them: the job may start
    head_only = {"CPU": 4.0, "memory": 1e10}
    reachable = reachable_resources(head_only, {"CPU": 36.0, "GPU": 4.0})
    assert reachable == {"CPU": 36.0, "GPU": 4.0, "memory": 1e10}
    assert reachable_resources(head_only, None) == head_only
    check_cluster(gpu, server, nodes=1, can_add_nodes=True, reachable=reachable)
    with pytest.raises(ConfigError, match=r"^train.use_gpu = true \(2 workers x 1\): 2 GPUs wanted, the cluster can "
                                          r"have, its autoscaler included, 0 \(add a GPU node type"):
        check_cluster(gpu, server, nodes=1, can_add_nodes=False, reachable=head_only)
    with pytest.raises(ConfigError, match=r"^train.num_workers = 2 exceeds the 1 CPUs the cluster can have \(use at most 1"):
        check_cluster(Config.model_validate({}), server, nodes=1, can_add_nodes=False, reachable={"CPU": 1.0})


def test_a_resume_with_another_config_is_refused_naming_the_keys():
    from pipelines.config import check_resume

    first = load_config("configs/smoke.yaml", ["tracking.run_name=r"])
    saved = json.loads(json.dumps(first.flat(), default=str))  # as run.py writes config.json
    # where and how it runs may change
    check_resume(saved, load_config("configs/smoke.yaml", ["tracking.run_name=r", "train.max_failures=3",
                                                           "refresh.pool_size=2", "ray.num_cpus=2"]))
    changed = load_config("configs/smoke.yaml", ["tracking.run_name=r", "train.lr=0.01", "sampler.k=5"])
    with pytest.raises(ConfigError, match=r"resumes a run started with another config: sampler.k = 5 \(was 10\), "
                                          r"train.lr = 0.01 \(was 0.002\); resume with the original values"):
        check_resume(saved, changed)
    with pytest.raises(ConfigError, match=r"loss.sscl.n_hard = 8 \(was 64\)"):
        check_resume(saved, load_config("configs/smoke.yaml", ["tracking.run_name=r", "loss.sscl.n_hard=8"]))
    # a run started before a key existed (augment.crop_min) resumes while the key keeps its default
    older = {k: v for k, v in saved.items() if k != "augment.crop_min"}
    check_resume(older, first)
    with pytest.raises(ConfigError, match=r"augment.crop_min = 0.35 \(was None\)"):
        check_resume(older, load_config("configs/smoke.yaml", ["tracking.run_name=r", "augment.crop_min=0.35"]))
