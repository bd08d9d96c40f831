"""The kernel-size ablation (Tables 5 and 7): kernel size and family of a model, the families, the
tables' values and changes, and `python -m lkfast.eval --suite ablation` on models trained by
`python -m lkfast.train --kernel-sizes K` (the training folder tells the eval how the model was built)."""
import json

import pytest
import torch

timm = pytest.importorskip("timm")

from lkfast.analysis import ablation_families, kernel_family, model_kernel_size  # noqa: E402
from lkfast.analysis.ablation import table5_rows, table7_rows  # noqa: E402
from lkfast.models import RepLKNet, create_model  # noqa: E402
from optional_deps import needs_frost  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.mark.parametrize("name, family", [
    ("replknet_31b", "replknet_b"), ("replknet_3b", "replknet_b"), ("replknet_31b.in22k_ft_in1k_384", "replknet_b"),
    ("replknet_31l", "replknet_l"), ("replknet_xl", "replknet_xl"), ("replknet_tiny_k31", "replknet_tiny"),
    ("replknet_tiny_k3", "replknet_tiny"), ("convnext_tiny", "convnext_tiny"), ("vit_base_patch16_224", "vit_base_patch16_224"),
])
def test_kernel_family(name, family):
    assert kernel_family(name) == family


def test_model_kernel_size_reads_the_depthwise_kernels():
    arch = dict(large_kernel_sizes=(9, 7, 5, 3), layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), small_kernel=3)
    model = RepLKNet(**arch).eval()
    assert model_kernel_size(model) == 9
    model.structural_reparam()  # merged: the same kernels
    assert model_kernel_size(model) == 9
    assert model_kernel_size(RepLKNet(**dict(arch, large_kernel_sizes=(3, 3, 3, 3), small_kernel=None))) == 3
    assert model_kernel_size(timm.create_model("test_convnext", kernel_sizes=13)) == 13
    assert model_kernel_size(create_model("resnet_tiny", num_classes=10)) is None  # no depthwise conv
    assert model_kernel_size(create_model("vit_tiny_p8", num_classes=10)) is None


def test_families_keep_only_architectures_at_two_or_more_kernel_sizes():
    models = {"k31": ("replknet_b", 31), "k3": ("replknet_b", 3), "vit": ("vit_b", None),
              "cn-a": ("convnext_tiny", 7), "cn-b": ("convnext_tiny", 7), "lone": ("other", 5)}
    assert ablation_families(models) == {"replknet_b": [(3, "k3"), (31, "k31")]}
    models["cn-c"] = ("convnext_tiny", 51)
    assert ablation_families(models)["convnext_tiny"] == [(7, "cn-a"), (7, "cn-b"), (51, "cn-c")]


RESULTS = {
    "RepLKNet-31B": {"clean": {"top1": 85.2}, "imagenet-a": {"top1": 29.4}, "imagenet-c": {"sev5_top1": 49.2},
                     "imagenet-r": {"top1": 43.9}, "imagenet-o": {"aupr": 78.9}, "occlusion": {"salient_drop_50": -25.1},
                     "frequency": {"change_at_0_7pi": -5.0}},
    "ViT-B": {"imagenet-a": {"top1": 26.7}, "imagenet-c": {"sev5_top1": 42.2}, "imagenet-r": {"top1": 38.0},
              "imagenet-o": {"aupr": 68.0}, "occlusion": {"salient_drop_50": -44.4},
              "frequency": {"change_at_0_7pi": -6.6}},
    "RepLKNet-3B": {"clean": {"top1": 80.0}, "imagenet-a": {"top1": 14.6}, "imagenet-c": {"sev5_top1": 39.1},
                    "imagenet-r": {"top1": 32.9}, "imagenet-o": {"aupr": 51.6},
                    "occlusion": {"salient_drop_50": -61.8}},  # no frequency result
}


def test_table5_is_the_papers_layout_with_changes_against_the_reference():
    members = [(3, "RepLKNet-3B"), (31, "RepLKNet-31B")]
    rows = table5_rows(RESULTS, members, reference="ViT-B")
    # the paper's Table 5: the ViT row bare, every other value with its change against the ViT
    assert rows[0] == ["ViT-B", "—", "26.7", "42.2", "38.0", "68.0", "-44.4", "-6.6"]
    assert rows[1] == ["RepLKNet-3B", "3×3", "14.6 (-12.1)", "39.1 (-3.1)", "32.9 (-5.1)", "51.6 (-16.4)",
                       "-61.8 (-17.4)", None]
    assert rows[2] == ["RepLKNet-31B", "31×31", "29.4 (+2.7)", "49.2 (+7.0)", "43.9 (+5.9)", "78.9 (+10.9)",
                       "-25.1 (+19.3)", "-5.0 (+1.6)"]
    # against a member of the family: that row bare, no extra row
    rows = table5_rows(RESULTS, members, reference="RepLKNet-31B")
    assert [r[0] for r in rows] == ["RepLKNet-3B", "RepLKNet-31B"]
    assert rows[0][2] == "14.6 (-14.8)" and rows[1][2] == "29.4"
    assert rows[0][-1] is None and rows[1][-1] == "-5.0"  # 3B has no frequency result
    assert table5_rows(RESULTS, members)[0][2:4] == [14.6, 39.1]  # no reference: plain numbers
    assert table7_rows(RESULTS, members) == [["RepLKNet-3B", "3×3", 80.0, 14.6, 32.9],
                                             ["RepLKNet-31B", "31×31", 85.2, 29.4, 43.9]]


def _image_folder(root, classes, per_class, seed):
    from lkfast import data

    g = torch.Generator().manual_seed(seed)
    for wnid in classes:
        for i in range(per_class):
            path = root / wnid / f"img{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode_jpeg(data.to_uint8(torch.rand(3, 32, 32, generator=g)), quality=95))


@needs_frost
def test_eval_ablation_suite_on_models_trained_at_two_kernel_sizes(tmp_path):
    """Train test_convnext at kernel 3 and 7 with python -m lkfast.train, evaluate both folders with
    --suite ablation (the tasks of the tables), and find Tables 5 and 7 with one row per kernel size, the values
    the other tasks measured, and the figure."""
    from lkfast import data
    from lkfast.eval.cli import main
    from lkfast.train import train

    wnids = data.imagenet_classes()[1:3]
    _image_folder(tmp_path / "data" / "train", wnids, 3, seed=0)
    _image_folder(tmp_path / "val", wnids, 2, seed=1)
    for k in (3, 7):
        train(["test_convnext", "--data", str(tmp_path / "data"), "--out", str(tmp_path / f"k{k}"), "--epochs", "1",
               "--batch-size", "3", "--kernel-sizes", str(k), "--num-classes", "1000", "--input-size", "32",
               "--max-steps-per-epoch", "1", "--quiet", "--device", "cpu"])
    out = tmp_path / "out"
    models = f"test_convnext:{tmp_path / 'k3'}=CN-k3,test_convnext:{tmp_path / 'k7' / 'model.safetensors'}=CN-k7"
    assert main(["--models", models, "--val-dir", str(tmp_path / "val"), "--out", str(out), "--input-size", "32",
                 "--workers", "0", "--no-progress", "--suite", "ablation"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {k: results["CN-k3"]["ablation"][k] for k in ("name", "family", "kernel_size")} == \
        {"name": "test_convnext", "family": "test_convnext", "kernel_size": 3}
    # the suite runs every task the tables need; ImageNet-C is generated from val
    assert set(results["CN-k3"]) >= {"clean", "imagenet-c", "occlusion", "frequency", "ablation"}
    assert results["CN-k7"]["ablation"]["kernel_size"] == 7
    report = (out / "report.md").read_text()
    assert "### Table 5 layout: test_convnext" in report and "### Table 7 layout: test_convnext" in report
    assert "Columns not measured" in report and "imagenet-a" in report
    table7 = (out / "tables" / "table7_ablation_test_convnext.csv").read_text().splitlines()
    assert table7[0] == "Model,Kernel,ImgN,ImgN-A,ImgN-R"
    for line, label, k in zip(table7[1:], ("CN-k3", "CN-k7"), (3, 7)):
        cells = line.split(",")
        assert cells[:2] == [label, f"{k}×{k}"]
        assert float(cells[2]) == pytest.approx(results[label]["clean"]["top1"], abs=0.01)
    table5 = (out / "tables" / "table5_ablation_test_convnext.md").read_text().splitlines()
    # against the largest kernel (no ViT in the run): k7 bare, k3 with its change, as the paper writes them
    k3, k7 = (results[m]["frequency"]["change_at_0_7pi"] for m in ("CN-k3", "CN-k7"))
    row = {line.split(" | ")[0].strip("| "): line.strip(" |").split(" | ") for line in table5 if line.startswith("| CN-")}
    assert row["CN-k7"][-1] == f"{k7 + 0.0:.1f}" and row["CN-k3"][-1] == f"{k3 + 0.0:.1f} ({k3 - k7 + 0.0:+.1f})"
    # the CSV holds numbers (it held the text "29.4 (+2.7)"): each value and its change in columns of their own
    csv5 = (out / "tables" / "table5_ablation_test_convnext.csv").read_text().splitlines()
    assert csv5[0].startswith("Model,Kernel,ImageNet-A,ImageNet-A change,ImageNet-C,ImageNet-C change,")
    assert csv5[0].endswith(",Noise-0.7π,Noise-0.7π change")
    cells = {line.split(",")[0]: line.split(",") for line in csv5[1:]}
    assert cells["CN-k7"][1] == "7" and float(cells["CN-k7"][-2]) == pytest.approx(k7) and cells["CN-k7"][-1] == ""
    assert float(cells["CN-k3"][-2]) == pytest.approx(k3) and float(cells["CN-k3"][-1]) == pytest.approx(k3 - k7)
    assert (out / "figures" / "ablation_kernel_size.png").stat().st_size > 0


def test_a_training_folder_is_read_as_it_was_trained(tmp_path):
    from lkfast.eval.models import ModelSpec, with_training_run

    folder = tmp_path / "run"
    folder.mkdir()
    summary = {"model": "convnext_tiny", "classes": ["a", "b", "c"], "recipe": {"kernel_sizes": 31, "num_classes": None}}
    (folder / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(FileNotFoundError, match="without model.safetensors"):
        with_training_run(ModelSpec.parse(f"convnext_tiny:{folder}"))
    (folder / "model.safetensors").write_bytes(b"x")
    spec = with_training_run(ModelSpec.parse(f"convnext_tiny:{folder}"))
    assert spec.checkpoint == str(folder / "model.safetensors")
    assert dict(spec.kwargs) == {"kernel_sizes": 31, "num_classes": 3}
    with pytest.raises(ValueError, match="trained as 'convnext_tiny'.*names 'convnext_small'"):
        with_training_run(ModelSpec.parse(f"convnext_small:{folder}"))
    (folder / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a python -m lkfast.train summary"):
        with_training_run(ModelSpec.parse(f"convnext_tiny:{folder}"))
    other = tmp_path / "weights.pth"  # any other checkpoint: unchanged
    other.write_bytes(b"x")
    assert with_training_run(ModelSpec.parse(f"convnext_tiny:{other}")) == ModelSpec.parse(f"convnext_tiny:{other}")
