"""Running the methods benchmark's rows: calibrating seconds per step, training each row for the budget,
probing its encoder, the random-init floors and a given teacher, and merging earlier runs' results."""

from __future__ import annotations

import json
import math
import time
import traceback

import torch

from methods_claims import check_claim, logged_series, mean_of
from methods_render import fmt_num, fmt_pct
from methods_rows import ROOT, TEACHER, is_teacher_row, recipe_of, split_variant


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# budget


def steps_for_budget(budget_s: float, s_per_step: float, min_steps: int = 1, max_steps: int | None = None) -> int:
    """Optimizer steps that fit `budget_s` seconds at `s_per_step` (at least `min_steps`, at most `max_steps`)."""
    if not (s_per_step > 0 and math.isfinite(s_per_step)):
        raise ValueError(f"seconds per step must be a positive number, got {s_per_step}")
    steps = max(int(min_steps), int(budget_s / s_per_step))
    return min(steps, int(max_steps)) if max_steps else steps


def calibrate(cfg, data, warmup: int = 2, steps: int = 4) -> dict:
    """Seconds per optimizer step of a fresh copy of the method, as the trainer runs it (data loading,
    begin_step, forward, backward, AdamW step, end_step); the timed steps are spread over the schedule."""
    from torch.utils.data import DataLoader, default_collate

    from mimkit.engine.optim import build_optimizer, no_decay_names
    from mimkit.methods import build_method

    torch.manual_seed(cfg.trainer.seed)
    # the data statistics as the trainer resolves them (a frozen teacher converts the images with them)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"mean": list(data.mean), "std": list(data.std)})})
    method = build_method(cfg, tuple(data.img_size), int(data.channels)).train()
    method.prepare(data.train, cfg.trainer.seed)  # as the trainer does before a fresh run (CCViT's k-means)
    opt = build_optimizer(method, cfg.optim, no_decay_names(method))
    batch_size = cfg.optim.batch_size // cfg.optim.accumulate
    loader = DataLoader(data.train, batch_size=batch_size, shuffle=False, drop_last=True, num_workers=0,
                        collate_fn=default_collate)
    pseudo_total = 100  # hooks see progress 0 during warm-up, then points spread over (0, 1)
    times, it = [], iter(loader)
    for i in range(warmup + steps):
        step = 0 if i < warmup else round(pseudo_total * (i - warmup + 0.5) / steps)
        t = time.perf_counter()
        if hasattr(method, "begin_step"):
            method.begin_step(step, pseudo_total)
        for _ in range(cfg.optim.accumulate):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            out = method(batch)
            (out["loss"] / cfg.optim.accumulate).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(method, "end_step"):
            method.end_step(step, pseudo_total)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    return {"s_per_step": times[len(times) // 2], "step_times": times, "warmup": warmup}


def evaluate(encoder, probe_data, args, ecfg, device, pool: str = "cls") -> dict:
    from mimkit.eval.attentive import attentive_probe
    from mimkit.eval.features import extract_tokens
    from mimkit.eval.knn import knn_accuracy
    from mimkit.eval.linear import linear_probe

    train, test = probe_data
    t0 = time.perf_counter()
    encoder = encoder.to(device).eval()
    ttr, ytr = extract_tokens(encoder, train, batch_size=ecfg.batch_size, device=device)
    tte, yte = extract_tokens(encoder, test, batch_size=ecfg.batch_size, device=device)
    out = {"tokens_s": time.perf_counter() - t0}
    # the recipe's eval.pool: the class token, or the mean patch token for methods that never train the class
    # token (I-JEPA's predictor reads patch tokens only)
    if pool == "mean":
        xtr, xte = ttr[:, 1:].float().mean(1), tte[:, 1:].float().mean(1)
    else:
        xtr, xte = ttr[:, 0].float(), tte[:, 0].float()
    out = {**out, "pool": pool}
    out["knn"] = float(knn_accuracy(xtr, ytr, xte, yte, k=ecfg.knn_k, temperature=ecfg.knn_temperature))
    lp = linear_probe(xtr, ytr, xte, yte, ecfg.linear_lrs, ecfg.linear_epochs, ecfg.batch_size, ecfg.val_fraction,
                      ecfg.linear_weight_decay, ecfg.seed, num_classes=10)
    out["linear"], out["linear_lr"] = lp["test_acc"], lp["best_lr"]
    na = min(len(ttr), args.attentive_train)
    ap = attentive_probe(ttr[:na].float(), ytr[:na], tte.float(), yte, kinds=("cross_attention",),
                         epochs=ecfg.attentive_epochs, lr=ecfg.attentive_lr, num_heads=ecfg.attentive_heads,
                         val_fraction=ecfg.val_fraction, seed=ecfg.seed, num_classes=10)
    out["attentive"] = ap["rows"][0]["test_acc"]
    out.update(attention_stats(encoder, test, device))
    out["eval_s"] = time.perf_counter() - t0
    return out


def attention_stats(encoder, test, device, images: int = 64) -> dict:
    """The last block's attention NMI and mean attention distance (pixels), averaged over heads, on the first
    test images (`mimkit.eval.analysis`, what "What do self-supervised ViTs learn?" reads); {} for encoders
    whose attention cannot be read."""
    from mimkit.eval.analysis import attention_nmi, mean_attention_distance

    x = torch.stack([test[i]["image"] for i in range(min(images, len(test)))]).to(device)
    try:
        return {"attn_nmi": float(attention_nmi(encoder, x, layers=[-1]).mean()),
                "attn_distance": float(mean_attention_distance(encoder, x, layers=[-1]).mean())}
    except (ValueError, AttributeError, TypeError):
        return {}


def run_method(name: str, args, common: list[str], base_cfg, data, probe_data, ecfg, device, rows) -> dict:
    from mimkit.config import load_config
    from mimkit.engine import train

    row: dict = {"method": name, "stage": "config", "eval_test": len(probe_data[1])}
    base, variant = split_variant(name)
    recipe = ROOT / "configs" / f"{recipe_of(base)}_vit_tiny_fmnist.yaml"
    try:
        if not recipe.is_file():
            raise FileNotFoundError(f"no recipe {recipe.relative_to(ROOT)}")
        row["recipe"] = str(recipe.relative_to(ROOT))
        if variant:
            row["overrides"] = variant
        wiring = wiring_overrides(load_config(recipe, common + variant).method, args, rows)
        if wiring:
            row["wiring"] = wiring
        cfg = load_config(recipe, common + wiring + variant)
        if cfg.data != base_cfg.data:  # one dataset for all: the recipe's data section is replaced
            row["note"] = "recipe's data section replaced by the shared one"
            cfg = cfg.model_copy(update={"data": base_cfg.data})
        row["stage"] = "calibration"
        cal = calibrate(cfg, data, args.calibration_warmup, args.calibration_steps)
        budget = args.teacher_budget_s if is_teacher_row(name) else args.budget_s
        row["budget_s"] = budget
        steps = steps_for_budget(budget, cal["s_per_step"], args.min_steps)
        row.update({"s_per_step": cal["s_per_step"], "calibration_times": cal["step_times"], "max_steps": steps})
        log(f"{name}: {cal['s_per_step']:.3f} s/step -> {steps} steps of {cfg.optim.batch_size}")
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"max_steps": steps})})
        row["stage"] = "training"
        t = time.perf_counter()
        res = train(cfg, data=data)
        row["wall_s"] = time.perf_counter() - t
        m, hist = res.metrics, res.history
        losses = logged_series(hist, "loss")
        tail = losses[-max(1, len(losses) // 10):]
        row.update({
            "steps": int(m["global_step"]), "batch_size": cfg.optim.batch_size,
            "images_seen": int(m["global_step"]) * cfg.optim.batch_size, "images_per_s": float(m["images_per_s"]),
            "train_s": int(m["global_step"]) * cfg.optim.batch_size / max(float(m["images_per_s"]), 1e-9),
            "loss_first": losses[0] if losses else None, "loss_final": mean_of(tail) if tail else None,
            "val_loss": None if m.get("val_loss") is None else float(m["val_loss"]),
            "history": hist, "run_dir": str(res.run_dir),
        })
        log(f"{name}: {row['steps']} steps in {row['train_s']:.0f}s ({row['images_per_s']:.1f} img/s), loss "
            f"{fmt_num(row['loss_first'])} -> {fmt_num(row['loss_final'])}, val_loss {fmt_num(row['val_loss'])}")
        row["stage"] = "evaluation"
        row.update(evaluate(res.method.encoder, probe_data, args, ecfg, device, cfg.eval.pool))
        log(f"{name}: kNN {fmt_pct(row['knn'])}%, linear {fmt_pct(row['linear'])}%, attentive "
            f"{fmt_pct(row['attentive'])}% ({row['eval_s']:.0f}s)")
        row["stage"] = "done"
        del res
    except Exception as err:  # report and go on with the next method
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        row["traceback"] = traceback.format_exc()
        log(f"{name}: FAILED during {row['stage']}: {row['error']}")
    row["claim"] = check_claim(name, row.get("history") or [], row, rows)
    return row


def teacher_for(args) -> dict[str, str]:
    """--teacher-for FIELD=ROW pairs: teacher field FIELD reads row ROW's run instead of the teacher row's."""
    out = {}
    for pair in args.teacher_for:
        field, sep, row = pair.partition("=")
        if not sep or not field or not row:
            raise SystemExit(f"--teacher-for {pair!r}: write FIELD=ROW, e.g. feature_teacher=teacher:ibot")
        out[field.strip()] = row.strip()
    return out


def wiring_overrides(method_cfg, args, rows: dict) -> list[str]:
    """What a method needs from outside its recipe: every frozen-teacher field (a TeacherConfig) reads the
    benchmark's teacher (the "teacher" row's run, or --teacher) unless --teacher-for gives it another row's
    run, and a `tokenizer` field (BEiT v2) the vqkd row's run. The recipes name runs under runs/ that a user
    makes first; here they come from this run."""
    from mimkit.targets.teacher import teacher_fields

    out = []
    chosen = teacher_for(args)
    for f in teacher_fields(type(method_cfg)):
        if f in chosen:
            source = (rows.get(chosen[f]) or {}).get("run_dir")
            if not source or rows[chosen[f]].get("stage") != "done":
                raise ValueError(f"{method_cfg.name}.{f} reads row {chosen[f]!r} (--teacher-for), which has not run "
                                 "to the end before it")
        else:
            source = args.teacher or (rows.get(TEACHER) or {}).get("run_dir")
            if not source:
                raise ValueError(f"{method_cfg.name} needs a teacher: give --teacher RUN or --teacher-budget-s S")
        out.append(f"method.{f}.source={source}")
    if "tokenizer" in type(method_cfg).model_fields:
        vqkd = (rows.get("vqkd") or {}).get("run_dir")
        if not vqkd or (rows.get("vqkd") or {}).get("stage") != "done":
            raise ValueError(f"{method_cfg.name} predicts the codes of a VQ-KD tokenizer: run the vqkd row first")
        out.append(f"method.tokenizer={vqkd}")
    return out


def needs_teacher(name: str) -> bool:
    """Does this row's recipe have a frozen-teacher field (so the run needs a teacher row or --teacher)?"""
    from mimkit.config import load_config
    from mimkit.targets.teacher import teacher_fields

    recipe = ROOT / "configs" / f"{split_variant(name)[0]}_vit_tiny_fmnist.yaml"
    return recipe.is_file() and bool(teacher_fields(type(load_config(recipe).method)))


def merge_results(runs: list[dict]) -> dict:
    """Several --json results as one: rows in order of first appearance, a later run's row replacing an
    earlier one's; the first run's setup (the others are checked against it), every command kept."""
    out = {"setup": dict(runs[0]["setup"]), "order": [], "rows": {}}
    commands, teacher_for = [], []
    for run in runs:
        for k in ("budget_s", "batch_size", "seed", "eval_train", "eval_test", "attentive_train", "device"):
            if run["setup"].get(k) != out["setup"].get(k):
                raise SystemExit(f"cannot merge runs measured differently: {k} {run['setup'].get(k)} vs "
                                 f"{out['setup'].get(k)}")
        commands += run["setup"].get("commands") or [run["setup"]["command"]]
        teacher_for += run["setup"].get("teacher_for") or []
        for name in run["order"]:
            if name not in out["order"]:
                out["order"].append(name)
            out["rows"][name] = run["rows"][name]
    out["setup"]["commands"] = list(dict.fromkeys(commands))
    out["setup"]["teacher_for"] = list(dict.fromkeys(teacher_for))
    return out


def given_teacher_row(args, probe_data, ecfg) -> dict:
    """The --teacher run's encoder through the same probes (what the distillation rows are compared with)."""
    from mimkit.engine.checkpoint import encoder_from_checkpoint, find_checkpoint, load_checkpoint

    row: dict = {"method": TEACHER, "stage": "evaluation", "eval_test": len(probe_data[1]), "run_dir": None,
                 "source": str(args.teacher)}
    try:
        path = find_checkpoint(args.teacher)
        encoder, cfg, ckpt = encoder_from_checkpoint(path)
        progress = load_checkpoint(path).get("progress") or {}
        row["steps"] = progress.get("global_step")
        row.update(evaluate(encoder, probe_data, args, ecfg, args.device, cfg.eval.pool))
        row["stage"] = "done"
        log(f"teacher {args.teacher}: kNN {fmt_pct(row['knn'])}%, linear {fmt_pct(row['linear'])}%")
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:300]
        row["traceback"] = traceback.format_exc()
    row["claim"] = {"status": "n/a", "claim": None, "evidence": f"the given frozen teacher ({args.teacher})"}
    return row


def random_floor(name: str, pool: str, merged, base_cfg, data, probe_data, args, ecfg) -> dict:
    """The untrained MAE-recipe encoder through the same probes (reused from a merged run when it has it)."""
    from mimkit.methods import build_method

    if merged and merged["rows"].get(name, {}).get("stage") == "done":
        return merged["rows"][name]
    rnd: dict = {"method": name, "stage": "evaluation", "eval_test": len(probe_data[1])}
    try:
        torch.manual_seed(args.seed)
        enc = build_method(base_cfg, tuple(data.img_size), int(data.channels)).encoder
        rnd.update(evaluate(enc, probe_data, args, ecfg, args.device, pool))
        rnd["stage"] = "done"
        log(f"{name}: kNN {fmt_pct(rnd['knn'])}%, linear {fmt_pct(rnd['linear'])}%, attentive {fmt_pct(rnd['attentive'])}%")
    except Exception as err:
        rnd["error"] = f"{type(err).__name__}: {err}"[:300]
        rnd["traceback"] = traceback.format_exc()
    rnd["claim"] = {"status": "n/a", "claim": None, "evidence": "untrained floor"}
    return rnd


def check_mergeable(old: dict, args, eval_train: int, eval_test: int) -> None:
    """Rows of two runs share a table only if they were measured alike."""
    same = {"budget_s": args.budget_s, "batch_size": args.batch_size, "seed": args.seed, "eval_train": eval_train,
            "eval_test": eval_test, "attentive_train": min(args.attentive_train, eval_train), "device": args.device}
    diff = [f"{k}: {old.get(k)} there, {v} here" for k, v in same.items() if old.get(k) != v]
    if diff:
        raise SystemExit("cannot merge with a run measured differently: " + "; ".join(diff))


def exit_status(rows: dict) -> int:
    """Non-zero only when MAE was run and failed; other methods' failures are reported in the table."""
    mae = rows.get("mae")
    return 1 if mae is not None and mae.get("error") else 0
