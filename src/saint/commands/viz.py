"""``saint viz IMAGE``: a grid of the patches each method keeps at every pruning
block (SAINT, random and class-attention drop at SAINT's counts, ToMe merging as
many)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..adapters import find_adapter
from .options import (
    DEFAULT_MODEL_TAU,
    PAPER_TAU,
    add_model_options,
    check_output_file,
    default_tau,
    user_errors,
)
from .options import build_model as load_model


def _layers(text: str) -> list[int]:
    from .options import comma_list

    return comma_list(int, "block indices (e.g. 0,1,2)")(text)


def _methods(text: str) -> list[str]:
    from ..analysis.viz import ROW_LABELS

    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in ROW_LABELS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--methods takes a comma list of {sorted(ROW_LABELS)}; got {text!r}")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz",
        help="picture of the patches kept at each pruning block",
        description=(
            "Draw IMAGE with the patches kept after each pruning block highlighted (dropped ones "
            "dimmed; ToMe's merged groups filled with their mean colour), one row per method. "
            "Random and class-attention drop remove as many tokens per block as SAINT did."
        ),
    )
    p.add_argument("image", help="an image file")
    add_model_options(p)
    p.add_argument("--tau", type=float, default=None,
                   help=f"SAINT similarity threshold (default {DEFAULT_MODEL_TAU} for the default model, as in "
                        f"saint demo; {PAPER_TAU}, the paper's, for a timm --model; saint calibrate picks one per block)")
    p.add_argument("--k", type=int, default=5, help="SAINT degree vote")
    p.add_argument("--gamma", type=float, default=10.0, help="SAINT score sharpness")
    p.add_argument("--layers", type=_layers, default=None, help="SAINT pruning blocks, e.g. 0,1,2 (default first half)")
    p.add_argument("--methods", type=_methods, default=None, help="rows, from saint,random,attn,tome (default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-drop row")
    p.add_argument("--out", default=None, help="PNG path (default <image stem>_kept.png)")
    p.set_defaults(func=user_errors("viz", run))


def run(args: argparse.Namespace) -> int:
    """Trace every method on the image and save the grid; print the counts."""
    from timm.data import resolve_data_config

    from .. import assets
    from ..analysis.viz import DEFAULT_METHODS, compare_methods, display_image, render_grid

    path = Path(args.image)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; saint viz draws one image: give an image file inside it "
                         "(saint analyze takes folders)")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    check_output_file(args.out, "--out")
    model, model_name = load_model(args)
    methods = list(args.methods or DEFAULT_METHODS)
    if "attn" in methods and not _has_class_attention(model):
        if args.methods:
            raise ValueError(f"{model_name} has no class token, so the attn row cannot be drawn")
        methods.remove("attn")
        print(f"note: {model_name} has no class token; skipping the class-attention row")
    if args.tau is None:
        args.tau = default_tau(args.model)
    settings: dict[str, Any] = {"tau": args.tau, "k": args.k, "gamma": args.gamma}
    if args.layers is not None:
        settings["layers"] = args.layers
    x, _ = assets.load_images([assets.ImageRecord(path, None, "cli")], assets.eval_transform(model))
    maps = compare_methods(model, x, methods, settings, seed=args.seed)
    cfg = resolve_data_config({}, model=model)
    image = display_image(x, cfg["mean"], cfg["std"])
    out = Path(args.out) if args.out else Path(f"{path.stem}_kept.png")
    h, w = assets.input_size(model)
    size = f"{h if h == w else f'{h}x{w}'}px"
    named = model_name if model_name.endswith(size) else f"{model_name}, {size}"  # the default model's name has it
    title = f"{path.name}  |  {named}  |  SAINT tau={args.tau}, k={args.k}"
    render_grid(image, maps, find_adapter(model).grid(model).patch, out, title)
    for m in maps:
        print(f"{m.method:>7}: " + ", ".join(f"b{layer}={n}" for layer, n in zip(m.layers, m.kept, strict=True)))
    print(f"wrote {out}")
    return 0


def _has_class_attention(model: Any) -> bool:
    """Whether the model has a class token the ``attn`` method can rank by: its patch says
    (wherever the model keeps the token: timm's ``cls_token``, HF's embeddings, open_clip's
    ``class_embedding``)."""
    import saint

    try:
        saint.patch(model, "attn", r=1)
    except ValueError as e:
        if "needs a class token" in str(e):
            return False
        raise
    saint.unpatch(model)
    return True
