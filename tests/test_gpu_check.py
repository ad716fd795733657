"""Ready for the first GPU: real-size models with random weights by configuration, the prepared
GPU check run as its CPU smoke (so it cannot rot), and the loud marks of a random-weight run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import invoke_cli


def test_random_architectures_have_the_real_sizes() -> None:
    """Built on the meta device (no memory, no time): the parameter counts of SD 1.5 (UNet
    859.5 M, VAE 83.7 M, CLIP ViT-L/14 text encoder 123.1 M) and of SAM ViT-H (641 M)."""
    from annotators.sam import build_random_sam
    from generators.random_weights import build_random_pipeline

    pipe = build_random_pipeline("sd15", device="meta")
    count = {n: sum(p.numel() for p in getattr(pipe, n).parameters())
             for n in ("unet", "vae", "text_encoder")}
    assert count["unet"] == pytest.approx(859.52e6, rel=0.002), count
    assert count["vae"] == pytest.approx(83.65e6, rel=0.002), count
    assert count["text_encoder"] == pytest.approx(123.06e6, rel=0.002), count
    sam = build_random_sam("vit_h", device="meta")
    assert sum(p.numel() for p in sam.parameters()) == pytest.approx(641.1e6, rel=0.002)


def test_a_random_tiny_generator_makes_images_and_says_so() -> None:
    from generators.stable_diffusion import build

    section = {"model": "not/read", "scheduler": "ddim", "steps": 2, "guidance": 7.5,
               "resolution": 64, "dtype": "float32", "safety_checker": False,
               "weights": "random_tiny"}
    gen = build(section)
    assert gen.version.startswith("sd:random-tiny@")
    images, _ = gen.generate(["a photo of a single cat", "a dog"], [1, 2])
    assert images.shape == (2, 64, 64, 3) and images.dtype.name == "uint8"
    with pytest.raises(ValueError, match="unknown weights 'randm'"):
        build({**section, "weights": "randm"})


def test_random_weights_pass_the_check_without_weight_files(builtin_data: Path,
                                                          tmp_path: Path) -> None:
    keys = [f"data.root={builtin_data}", f"output.dir={tmp_path / 'out'}",
            "generation.backend=stable_diffusion", "annotation.backend=sam",
            "annotation.sam_checkpoint=/nowhere/sam_vit_h.pth",
            "training.init_checkpoint=/nowhere/init.pt"]
    code, text = invoke_cli("check", "--config", "configs/demo.yaml", *keys)
    assert code == 1 and "generation.model" in text and "sam_checkpoint" in text, text
    random = ["generation.weights=random", "annotation.weights=random",
              "training.weights=random"]
    code, text = invoke_cli("check", "--config", "configs/demo.yaml", *keys, *random)
    assert code == 0 and "all checks passed" in text, text
    for stage in ("generation", "annotation", "training"):
        assert f"{stage}.weights: random" in text, text


@pytest.mark.ray
@pytest.mark.slow
def test_the_gpu_check_runs_every_part_as_its_cpu_smoke(local_ray, tmp_path: Path) -> None:
    from benchmarks.gpu_check import REPORT_NAME, main

    results = main(["--cpu-smoke", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / f"{REPORT_NAME}.json").read_text())
    assert doc["smoke"] and doc["generation"]["version"].startswith("sd:random-tiny@")
    assert [r["batch"] for r in doc["generation"]["rows"]] == [1, 2]
    assert all(r["images_per_s"] > 0 for r in doc["generation"]["rows"])
    assert doc["annotation"]["version"] == "sam:random-tiny"
    assert doc["annotation"]["images_per_s"] > 0
    ratios = {r["method"]: r["ratio"] for r in doc["training"]["rows"]}
    assert ratios["plain"] == 1.0 and ratios["default"] > 0
    stream = doc["stream"]
    assert stream["counts_add_up"] and stream["decided"] == stream["candidates"] > 0
    assert stream["random_weights"] == ["generation", "annotation", "training"]
    assert 0 <= stream["trainer_wait_share"] <= 1
    page = (tmp_path / f"{REPORT_NAME}.md").read_text()
    assert "No GPU figures here" in page and "## Streaming job on one device" in page
    assert results["seconds"] > 0
    # A plan follows from the file it wrote.
    code, text = invoke_cli("plan", str(tmp_path / f"{REPORT_NAME}.json"), "--train-gpus", "2")
    assert code == 0 and "2 training worker(s) decide" in text, text


def test_a_random_weight_run_says_so_in_its_summary_and_report(tmp_path: Path) -> None:
    from pipeline.inspection.run_summary import summary_text
    from tests.conftest import make_rows, write_run

    rows = make_rows()
    for r in rows:
        r["generator"], r["annotator"] = "sd:random-sd15@0f0f0f0f", "sam:random-vit_h"
    write_run(str(tmp_path / "run"), rows)
    report = tmp_path / "report.html"
    code, text = invoke_cli("inspect", str(tmp_path / "run"), "--html", str(report))
    assert code == 0, text
    page = report.read_text()
    assert 'id="random-weights"' in page and "RANDOM WEIGHTS (generation, annotation)" in page
    normal = make_rows()
    write_run(str(tmp_path / "plain"), normal)
    code, text = invoke_cli("inspect", str(tmp_path / "plain"), "--html", str(report))
    assert code == 0 and 'id="random-weights"' not in report.read_text()
    summary = {"run": "r", "seconds": 1.0, "final_step": 2, "candidates_planned": 0,
               "decisions": {"accepted": 0, "rejected": 0, "invalid": 0},
               "counts_add_up": True, "groups": [], "random_weights": ["training"],
               "shards": "r/shards", "out": "r"}
    assert summary_text(summary).splitlines()[0].startswith("RANDOM WEIGHTS (training)")


def test_the_weights_keys_leave_the_hash_of_earlier_runs_alone() -> None:
    """A run checkpointed before the weights keys existed resumes: at "pretrained" they are
    not part of the config hash; "random" is, and cannot be switched on by a resume."""
    from pipeline.config import load_config
    from pipeline.storage.checkpoints import config_hash, decision_keys
    from tests.conftest import REPO_ROOT

    demo = REPO_ROOT / "configs" / "demo.yaml"
    cfg = load_config(demo)
    assert not [k for k in decision_keys(cfg) if k.endswith(".weights")]
    random = load_config(demo, ["training.weights=random"])
    assert decision_keys(random)["training.weights"] == "random"
    assert config_hash(random) != config_hash(cfg)
