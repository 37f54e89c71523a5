"""Fidelity metrics on hand-built embeddings with known answers, and image-set loading
(ImageFolder, labels CSV, flat folder)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from saint.eval.fidelity import (
    center,
    centered_cosine,
    cosine,
    fidelity_summary,
    retrieval_at_1,
    retrieval_ranks,
    top1_agreement,
    topk_accuracy,
)
from saint.measure import images as eval_data

# Four unit vectors at 90 degrees: the set's mean is zero, so centering changes nothing.
CROSS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    rot = torch.tensor([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    return x @ rot


def test_identical_embeddings_are_perfect() -> None:
    assert torch.allclose(centered_cosine(CROSS, CROSS), torch.ones(4, dtype=torch.float64))
    assert retrieval_at_1(CROSS, CROSS) == 1.0
    assert retrieval_ranks(CROSS, CROSS).tolist() == [0, 0, 0, 0]


def test_rotation_by_90_degrees_retrieves_the_neighbour() -> None:
    p = rotate(CROSS, 90)  # p[i] == CROSS[i + 1]
    assert torch.allclose(p, CROSS.roll(-1, dims=0), atol=1e-6)
    assert torch.allclose(centered_cosine(p, CROSS), torch.zeros(4, dtype=torch.float64), atol=1e-6)
    assert retrieval_at_1(p, CROSS) == 0.0
    # own image ranks behind the one neighbour it now equals
    assert retrieval_ranks(p, CROSS).tolist() == [1, 1, 1, 1]


def test_rotation_by_30_degrees_keeps_retrieval() -> None:
    p = rotate(CROSS, 30)
    cc = centered_cosine(p, CROSS)
    assert torch.allclose(cc, torch.full((4,), math.cos(math.radians(30)), dtype=torch.float64), atol=1e-6)
    assert retrieval_at_1(p, CROSS) == 1.0


def test_tie_with_another_image_is_not_a_hit() -> None:
    p = CROSS + CROSS.roll(-1, dims=0)  # exactly between own and next image
    assert retrieval_at_1(p, CROSS) == 0.0


def test_centering_uses_the_reference_mean() -> None:
    ref = torch.tensor([[10.0, 1.0], [10.0, -1.0]])
    pruned = torch.tensor([[10.0, 2.0], [10.0, -0.5]])
    p, r = center(pruned, ref)
    assert p.tolist() == [[0.0, 2.0], [0.0, -0.5]]
    assert r.tolist() == [[0.0, 1.0], [0.0, -1.0]]
    assert centered_cosine(pruned, ref).tolist() == [1.0, 1.0]
    raw0 = (100 + 2) / math.sqrt(104 * 101)
    assert cosine(pruned, ref)[0].item() == pytest.approx(raw0, abs=1e-12)


def test_centered_metrics_ignore_a_shared_offset() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(12, 8, generator=g)
    pruned = ref + 0.3 * torch.randn(12, 8, generator=g)
    shift = 5 * torch.randn(1, 8, generator=g)
    assert torch.allclose(centered_cosine(pruned + shift, ref + shift), centered_cosine(pruned, ref), atol=1e-9)
    assert retrieval_at_1(pruned + shift, ref + shift) == retrieval_at_1(pruned, ref)
    # the raw cosine is inflated by the shared offset; the centered one is not
    assert cosine(pruned + shift, ref + shift).mean() > cosine(pruned, ref).mean()


def test_top1_agreement_and_accuracy() -> None:
    ref = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 0, 1], [5, 0, 0]])
    pruned = torch.tensor([[2.0, 1, 0], [0, 1, 2], [0, 0, 1], [0, 5, 0]])
    assert top1_agreement(pruned, ref) == 0.5
    labels = torch.tensor([0, 2, -1, 1])  # one unlabelled
    assert topk_accuracy(pruned, labels, 1) == 1.0
    assert topk_accuracy(ref, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(ref, labels, 2) == 1.0
    assert topk_accuracy(ref, torch.full((4,), -1), 1) is None
    with pytest.raises(ValueError, match="outside the model's 3 classes"):
        topk_accuracy(ref, torch.tensor([0, 1, 2, 3]), 1)


def test_summary_and_shape_errors() -> None:
    s = fidelity_summary(CROSS, CROSS, CROSS, CROSS)
    assert s == {"centered_cosine": 1.0, "centered_cosine_min": 1.0, "cosine": 1.0, "retrieval_at_1": 1.0,
                 "top1_agreement": 1.0}
    with pytest.raises(ValueError, match="same shape"):
        centered_cosine(CROSS, CROSS[:3])
    with pytest.raises(ValueError, match="empty"):
        retrieval_at_1(CROSS[:0], CROSS[:0])


# ----------------------------------------------------------------------------- image sets


def _png(path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_imagefolder_with_plain_names_uses_sorted_index(tmp_path) -> None:
    for i, cls in enumerate(["zebra", "ant"]):
        for j in range(2):
            _png(tmp_path / cls / f"{j}.png", i * 10 + j)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    s = eval_data.from_folder(tmp_path)
    assert s.label_space == "folder"
    assert [(r.path.parent.name, r.label) for r in s.records] == [("ant", 0), ("ant", 0), ("zebra", 1), ("zebra", 1)]


def test_imagefolder_with_synsets_uses_imagenet_indices(tmp_path) -> None:
    _png(tmp_path / "n01443537" / "a.png")  # goldfish, ImageNet-1k index 1
    _png(tmp_path / "n01440764" / "b.png")  # tench, index 0
    s = eval_data.from_folder(tmp_path)
    assert s.label_space == "imagenet-1k"
    assert [r.label for r in s.records] == [0, 1]


def test_labels_csv_like_the_shared_folder(tmp_path) -> None:
    _png(tmp_path / "x.JPEG")
    _png(tmp_path / "y.JPEG")
    (tmp_path / "labels.csv").write_text("class_index,synset,class_name,file\n5,n1,a,x.JPEG\n,n2,b,y.JPEG\n")
    s = eval_data.resolve_images(str(tmp_path))  # labels.csv inside a folder wins
    assert [(r.path.name, r.label) for r in s.records] == [("x.JPEG", 5), ("y.JPEG", None)]
    assert s.label_space == "csv"
    assert len(eval_data.resolve_images(str(tmp_path / "labels.csv"), limit=1)) == 1


def test_bad_sources_fail_clearly(tmp_path) -> None:
    (tmp_path / "labels.csv").write_text("class_index,file\n1,missing.png\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        eval_data.from_csv(tmp_path / "labels.csv")
    (tmp_path / "bad.csv").write_text("class_index,name\n1,a\n")
    with pytest.raises(ValueError, match="'file' column"):
        eval_data.from_csv(tmp_path / "bad.csv")
    _png(tmp_path / "z.png")
    (tmp_path / "word.csv").write_text("class_index,file\ncat,z.png\n")
    with pytest.raises(ValueError, match="not an integer"):
        eval_data.from_csv(tmp_path / "word.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        eval_data.from_folder(empty)
    with pytest.raises(FileNotFoundError, match="neither"):
        eval_data.resolve_images(str(tmp_path / "nope"))


def test_flat_folder_is_unlabelled_and_batches_load(tmp_path) -> None:
    for j in range(3):
        _png(tmp_path / f"{j}.png", j)
    s = eval_data.from_folder(tmp_path)
    assert s.label_space is None and not s.has_labels

    def transform(im):
        return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)

    batches = list(eval_data.iter_batches(s.records, transform, 2))
    assert [b[0].shape[0] for b in batches] == [2, 1]
    assert batches[0][1].tolist() == [-1, -1]


def test_holdout_split_holds_out_every_nth_in_order() -> None:
    """Known answer on 17 stand-in records: the 8th and 16th are held out, the rest kept
    in order; the two parts partition the input."""
    records = list(range(17))
    held, rest = eval_data.holdout_split(records, 8)
    assert held == [7, 15]
    assert rest == [r for r in records if r not in (7, 15)]
    assert eval_data.holdout_split(records[:3], 8) == ([], [0, 1, 2])
    with pytest.raises(ValueError, match="every=1"):
        eval_data.holdout_split(records, 1)


@pytest.mark.parametrize("metric", [retrieval_at_1, centered_cosine, top1_agreement])
def test_non_finite_outputs_are_refused(metric):
    # an all-NaN pruned embedding ranked as its own image's nearest (rank 0, a hit)
    ref = torch.eye(4)
    bad = ref.clone()
    bad[1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        metric(bad, ref)
