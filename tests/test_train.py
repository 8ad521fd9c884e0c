"""The trainer: task sampling, stage-3 augmentations, every stage end to end, exact resume, DDP = 1 process."""
import gc
import json
import os
import socket
import time
import warnings
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from omni2sound.data.shards import FeatureTable
from omni2sound.model import Omni2SoundDiT, dit_config
from omni2sound.schedule import (
    TRAIN_PRESETS,
    TrainConfig,
    draw_task,
    make_dit_loss,
    stage3_augment,
    stage_named,
    step_indices,
)
from omni2sound.train import run
from omni2sound.trainer import DistInfo, LoopConfig, OptimConfig, Trainer, init_distributed, lr_lambda, seeded

C, DT, DV, DS = 4, 6, 5, 2


def synthetic_table(n=12, T=10, seed=0, text_offset=0.0):
    g = torch.Generator().manual_seed(seed)
    items = [{"clip_id": f"c{i}", "caption": f"cap {i}", "duration": T / 25,
              "latent_mean": torch.randn(T, C, generator=g), "latent_std": 0.1 * torch.rand(T, C, generator=g),
              "text": torch.randn(3 + i % 3, DT, generator=g) + text_offset, "video": torch.randn(4, DV, generator=g),
              "sync": torch.randn(9, DS, generator=g)} for i in range(n)]
    return FeatureTable.from_items(items)


def small_dit(seed=0, depth=1):
    torch.manual_seed(seed)
    return Omni2SoundDiT(dit_config("tiny", latent_dim=C, hidden_dim=32, depth=depth, num_heads=2, text_dim=DT,
                                    video_dim=DV, sync_dim=DS))


class Spy(torch.nn.Module):
    """Records the conditions the loss hands to the model; returns a velocity that depends on a parameter."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, cond):
        self.seen.append(cond)
        return x * self.w


def test_task_sampling_frequencies():
    cfg = TrainConfig()
    n = 4000
    tasks = [draw_task(stage_named(cfg, "stage2"), seeded(0, 2, s, 7)) for s in range(n)]
    for task, p in zip(("v2a", "t2a", "vt2a"), cfg.task_probs):
        assert abs(tasks.count(task) / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (task, tasks.count(task))
    assert {draw_task(stage_named(cfg, "stage1"), seeded(0, 1, s)) for s in range(50)} == {"t2a"}
    cfg2 = replace(cfg, task_probs=(0.0, 0.0, 1.0))
    assert {draw_task(stage_named(cfg2, "stage3"), seeded(0, 3, s)) for s in range(50)} == {"vt2a"}
    with pytest.raises(ValueError, match="task_probs"):
        replace(cfg, task_probs=(0.5, 0.5, 0.5)).validate()


def test_step_indices_walk_epochs_of_permutations():
    n, gb = 10, 4
    seen = torch.cat([step_indices(n, s, gb, 0, 2) for s in range(5)])            # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])
    torch.testing.assert_close(step_indices(n, 3, gb, 0, 2), seen[12:16])


def test_task_masks_and_null_dropout():
    cfg = replace(TrainConfig(), p_null=0.25)
    table = synthetic_table(64)
    spy = Spy()
    for stage, steps in (("stage1", 3), ("stage2", 30)):
        loss_fn = make_dit_loss(cfg, stage_named(cfg, stage), table, None, 64, DistInfo())
        for s in range(steps):
            loss, logs = loss_fn(spy, s, 0)
            c = spy.seen[-1]
            text_kept, video_kept = c.text_lens > 0, c.video_lens > 0
            if logs["task"] == "t2a":
                assert not video_kept.any() and c.sync.abs().sum() == 0
            if logs["task"] == "v2a":
                assert not text_kept.any()
            if logs["task"] == "vt2a":
                assert torch.equal(text_kept, video_kept)           # dropped together (joint CFG) or both kept
            if stage == "stage1":
                assert logs["task"] == "t2a"
    nulls = [float(((c.text_lens == 0) & (c.video_lens == 0)).float().mean()) for c in spy.seen[3:]]
    assert abs(sum(nulls) / len(nulls) - 0.25) < 0.06


def test_stage3_augmentations():
    cfg = replace(TrainConfig(), p_offscreen=0.4, p_text_drop=0.3)
    table, off = synthetic_table(400, seed=1), synthetic_table(400, seed=2, text_offset=100.0)
    idx = torch.arange(400)
    x1, cond = table.batch(idx, sample_latent=False)
    g = seeded(5)
    x1a, conda, n_off, n_drop = stage3_augment(cfg, x1, cond, idx, off, g, torch.Generator().manual_seed(0))
    replaced = (conda.text_tokens[:, 0, 0] > 50) & (conda.text_lens > 0)       # text from the off-screen table
    dropped = conda.text_lens == 0
    assert n_off == int(replaced.sum()) and n_drop == int(dropped.sum())
    assert abs(n_off / 400 - 0.4) < 0.08 and abs(n_drop / 400 - 0.3) < 0.08
    assert not (replaced & dropped).any()                                       # off-screen needs its text
    torch.testing.assert_close(conda.video_tokens, cond.video_tokens)           # the picture never changes
    torch.testing.assert_close(conda.sync, cond.sync)
    assert torch.equal(conda.video_lens, cond.video_lens)
    # replaced samples hear the off-screen table's sound (a posterior draw around its mean), the rest their own
    keep = ~replaced
    torch.testing.assert_close(x1a[keep], x1[keep])
    assert ((x1a[replaced] - off.latent_mean[replaced]).abs().max() < 1.0)
    assert not torch.allclose(x1a[replaced], x1[replaced])
    # the stage-3 loss augments VT2A batches only
    spy = Spy()
    cfg0 = replace(cfg, p_null=0.0)
    loss_fn = make_dit_loss(cfg0, stage_named(cfg0, "stage3"), table, off, 32, DistInfo())
    for s in range(12):
        _, logs = loss_fn(spy, s, 0)
        if logs["task"] != "vt2a":
            assert logs["offscreen_mixed"] == 0 and logs["text_dropped"] == 0
        else:
            assert logs["offscreen_mixed"] + logs["text_dropped"] > 0


def test_lr_schedule():
    f = lr_lambda(10, 100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1) and 0.1 < f(55) < 1.0


def _trainer(out_dir, table, steps, info=None, accum=1, micro=4, model=None, cuda_graph=False, parallel="ddp",
             grad_checkpointing=False, fsdp_bf16_params=True, bf16_weights=False):
    cfg = replace(TrainConfig(), p_null=0.2, seed=3)
    info = info or DistInfo()
    loop = LoopConfig(steps=steps, micro_batch=micro, accum=accum, log_every=1, ckpt_every=1, keep_last=2,
                      progress=False, cuda_graph=cuda_graph, parallel=parallel, grad_checkpointing=grad_checkpointing,
                      fsdp_bf16_params=fsdp_bf16_params, bf16_weights=bf16_weights)
    opt = OptimConfig(lr=1e-3, warmup=2, ema_decay=0.9)
    loss = make_dit_loss(cfg, stage_named(cfg, "stage2"), table, None, micro, info, accum)
    return Trainer(model or small_dit(), loss, loop, opt, out_dir, info, graph_step=loss.graph_step)


def test_ema_update_matches_the_formula():
    from omni2sound.trainer import EMA
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    m[1].weight.requires_grad_(False)                       # frozen: not tracked
    ema = EMA(m, decay=0.9, warmup=True)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.bias"}
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    ema.update(m)
    d = min(0.9, 2 / 11)                                    # warm-up decay at the first update
    params = dict(m.named_parameters())
    for k, v in ema.shadow.items():
        torch.testing.assert_close(v, d * before[k] + (1 - d) * params[k].detach(), rtol=1e-6, atol=1e-7)
    # a bf16 model keeps fp32 shadows (the per-tensor path)
    mb = torch.nn.Linear(3, 4).to(torch.bfloat16)
    eb = EMA(mb, decay=0.5, warmup=False)
    sb = {k: v.clone() for k, v in eb.shadow.items()}
    with torch.no_grad():
        mb.weight.add_(1.0)
    eb.update(mb)
    assert eb.shadow["weight"].dtype == torch.float32
    torch.testing.assert_close(eb.shadow["weight"], 0.5 * sb["weight"] + 0.5 * mb.weight.float())


def test_ema_state_round_trip_keeps_its_warmup_rule():
    # a stage that continues the previous stage's EMA runs it without warm-up; a resumed run (whose trainer builds
    # its EMA with the default warm-up) must take that rule back from the checkpoint, or its EMA drifts
    from omni2sound.trainer import EMA
    m = torch.nn.Linear(3, 2)
    src = EMA(m, decay=0.99, warmup=False)
    src.update(m)
    dst = EMA(m, decay=0.5, warmup=True)
    dst.load_state_dict(src.state_dict())
    assert (dst.warmup, dst.decay, dst.updates) == (False, 0.99, 1)
    with torch.no_grad():
        m.weight.add_(1.0)
    src.update(m)
    dst.update(m)
    torch.testing.assert_close(dst.shadow["weight"], src.shadow["weight"], rtol=0, atol=0)


def test_resume_after_kill_repeats_the_same_losses(tmp_path):
    table = synthetic_table(10)
    full = _trainer(str(tmp_path / "a"), table, 6)
    h_full = full.fit()
    part = _trainer(str(tmp_path / "b"), table, 6)
    part.fit(stop_after=3)                                  # "killed" after step 3 (checkpoint of step 3 on disk)
    assert len(part.checkpoints()) == 2                     # keep_last
    resumed = _trainer(str(tmp_path / "b"), table, 6, model=small_dit(seed=99))   # fresh process, other init
    h_res = resumed.fit(resume=True)
    assert [h["loss"] for h in h_res] == [h["loss"] for h in h_full]
    assert [h["task"] for h in h_res] == [h["task"] for h in h_full]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for k in full.ema.shadow:
        assert torch.equal(full.ema.shadow[k], resumed.ema.shadow[k]), k
    ck = torch.load(os.path.join(resumed.ckpt_dir, resumed.checkpoints()[-1]), weights_only=True)
    assert ck["step"] == 6 and ck["data_position"] == 6 * 4 and {"torch", "numpy", "python"} <= set(ck["rng"])
    logs = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6]
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in logs)


def test_cuda_graph_loop_trains_like_the_plain_loop(tmp_path):
    # LoopConfig.cuda_graph: the trainer hands each batch to GraphedTrainStep (here, off a GPU, its static step
    # run eagerly): the same losses, tasks, clipped grad norms, schedule and weights as the plain loop, and resume
    table = synthetic_table(10)
    plain = _trainer(str(tmp_path / "a"), table, 5)
    graphed = _trainer(str(tmp_path / "b"), table, 5, cuda_graph=True)
    h_plain, h_graph = plain.fit(), graphed.fit()
    assert [h["task"] for h in h_graph] == [h["task"] for h in h_plain]
    assert [h["loss"] for h in h_graph] == pytest.approx([h["loss"] for h in h_plain], rel=1e-4)
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in ("a", "b")]
    assert [r["lr"] for r in logs[1]] == pytest.approx([r["lr"] for r in logs[0]], rel=1e-6)
    assert [r["grad_norm"] for r in logs[1]] == pytest.approx([r["grad_norm"] for r in logs[0]], rel=1e-3)
    for (k, a), b in zip(plain.model.state_dict().items(), graphed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
    part = _trainer(str(tmp_path / "c"), table, 5, cuda_graph=True)
    part.fit(stop_after=2)
    resumed = _trainer(str(tmp_path / "c"), table, 5, model=small_dit(seed=99), cuda_graph=True)
    assert [h["loss"] for h in resumed.fit(resume=True)] == [h["loss"] for h in h_graph]


def test_bf16_weight_copies_train_resume_exactly_and_save_fp32(tmp_path):
    # LoopConfig.bf16_weights: the matrix weights train as bf16 copies of fp32 masters (bf16 autocast, here on the
    # CPU); the plain loop and the graph loop agree, a killed run resumes to the same losses and masters, and the
    # checkpoints and the model after fit() are fp32, as without copies
    table = synthetic_table(10)
    full = _trainer(str(tmp_path / "a"), table, 5, bf16_weights=True)
    assert full.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    h_full = full.fit()
    assert all(p.dtype == torch.float32 for p in full.model.parameters())
    ck = torch.load(os.path.join(full.ckpt_dir, full.checkpoints()[-1]), weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in ck["model"].items() if v.is_floating_point())
    assert all(torch.equal(ck["model"][k], v) for k, v in full.model.state_dict().items())
    plain = _trainer(str(tmp_path / "p"), table, 5)                      # fp32, no autocast on the CPU
    h_plain = plain.fit()
    assert [h["task"] for h in h_full] == [h["task"] for h in h_plain]
    assert [h["loss"] for h in h_full] == pytest.approx([h["loss"] for h in h_plain], rel=3e-2)
    part = _trainer(str(tmp_path / "b"), table, 5, bf16_weights=True)
    part.fit(stop_after=2)
    # loaded once: the masters hold the checkpoint's fp32 weights exactly, the module the bf16 copies rounded from them
    path = os.path.join(part.ckpt_dir, part.checkpoints()[-1])
    loaded = _trainer(str(tmp_path / "l"), table, 5, model=small_dit(seed=99), bf16_weights=True)
    loaded.load_checkpoint(path)
    ck = torch.load(path, weights_only=True)
    for name, p in loaded.model.named_parameters():
        master = loaded.opt.master(p)
        assert master.dtype == torch.float32 and torch.equal(master, ck["model"][name]), name
        if p in loaded.opt.copies:
            assert p.dtype == torch.bfloat16 and torch.equal(p, master.to(torch.bfloat16)), name
    resumed = _trainer(str(tmp_path / "b"), table, 5, model=small_dit(seed=99), bf16_weights=True)
    assert [h["loss"] for h in resumed.fit(resume=True)] == [h["loss"] for h in h_full]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for k in full.ema.shadow:
        assert torch.equal(full.ema.shadow[k], resumed.ema.shadow[k]), k
    graphed = _trainer(str(tmp_path / "g"), table, 5, cuda_graph=True, bf16_weights=True)
    assert [h["loss"] for h in graphed.fit()] == pytest.approx([h["loss"] for h in h_full], rel=1e-3)
    with pytest.raises(ValueError, match="bf16_weights needs bf16"):
        Trainer(small_dit(), None, LoopConfig(bf16=False, bf16_weights=True), OptimConfig(), str(tmp_path / "x"))


def test_cuda_graph_loop_refuses_what_it_cannot_capture(tmp_path):
    with pytest.raises(ValueError, match="accum 1"):
        _trainer(str(tmp_path / "a"), synthetic_table(4), 2, accum=2, cuda_graph=True)


def _ddp_worker(rank, world, port, out_dir, result, parallel="ddp", device="cpu", bf16_params=True):
    # loopback only: gloo otherwise picks the interface the hostname resolves to, which on some sandboxes is not
    # reachable and hangs the pair connection instead of failing
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    info = init_distributed(device, timeout_s=60)
    if world == 1:      # init_distributed makes no group for one process; the 1-rank FSDP2 check needs one
        import datetime
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=0, world_size=1,
                                             timeout=datetime.timedelta(seconds=60))
    torch.distributed.barrier()
    open(f"{result}.rendezvous{rank}", "w").close()
    if parallel == "ddp":
        tr = _trainer(out_dir, synthetic_table(10), 2, info=info, accum=1, micro=4)
        hist = tr.fit()
        if rank == 0:
            torch.save({"state": tr.model.state_dict(), "losses": [h["loss"] for h in hist]}, result)
    else:
        # FSDP2 over 2 DiT blocks, 2 micro-batches a step (the first one's gradients kept unreduced): 2 steps,
        # "killed", then a fresh sharded trainer (other init, activation checkpointing on) resumes step 3
        part = _trainer(out_dir, synthetic_table(10), 3, info=info, accum=2, micro=2, model=small_dit(depth=2),
                        parallel=parallel, fsdp_bf16_params=bf16_params)
        assert part.sharded and type(part.model.blocks[0].attn.qkv.weight).__name__ == "DTensor"
        if world == 1:      # a sharded model is not captured in a CUDA graph, on one rank either
            with pytest.raises(ValueError, match="no FSDP"):
                _trainer(out_dir + "_graph", synthetic_table(10), 3, info=info, model=small_dit(depth=2),
                         parallel=parallel, cuda_graph=True)
        part.fit(stop_after=2)
        del part
        gc.collect()
        tr = _trainer(out_dir, synthetic_table(10), 3, info=info, accum=2, micro=2, model=small_dit(seed=99, depth=2),
                      parallel=parallel, grad_checkpointing=True, fsdp_bf16_params=bf16_params)
        seen = set()                                       # the weights' dtype inside the forward (gathered)
        tr.model.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.add(m.qkv.weight.dtype))
        hist = tr.fit(resume=True)
        want = torch.bfloat16 if bf16_params and device.startswith("cuda") else torch.float32
        assert seen == {want}, seen
        raw, ema = tr.export_weights()                      # a collective: both ranks
        if rank == 0:
            torch.save({"state": raw, "ema": ema, "losses": [h["loss"] for h in hist],
                        "local_numel": sum(p.to_local().numel() for p in tr.model.parameters()),
                        "numel": sum(p.numel() for p in tr.model.parameters())}, result)
    # Tear down in order, as omni2sound.train.main does (the trainers die inside run()): the DDP reducer, while
    # the process group still exists, then the group, with both ranks past the save. Destroying the group under
    # a live DDP module left its destructor for interpreter exit, where it hung intermittently (2 of 3 runs here,
    # past the 240 s deadline, after both ranks had finished training).
    del tr
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    open(f"{result}.done{rank}", "w").close()           # every line of ours ran; what follows is interpreter exit


def _run_ddp_workers(world, port, out_dir, result, deadline_s=240.0, exit_grace_s=30.0, parallel="ddp",
                     device="cpu", bf16_params=True):
    """mp.spawn with a deadline: a hung rendezvous or collective kills the workers instead of the CI job. Workers
    that finished all their work (done markers) but have not exited ``exit_grace_s`` later are killed with a
    warning, not a failure: that hang is in torch's / Python's teardown, after everything this test checks."""
    ctx = mp.start_processes(_ddp_worker, args=(world, port, out_dir, result, parallel, device, bf16_params),
                             nprocs=world,
                             join=False,
                             start_method="spawn")
    t0, all_done = time.monotonic(), None
    try:
        while not ctx.join(timeout=2):
            if all_done is None and all(os.path.exists(f"{result}.done{r}") for r in range(world)):
                all_done = time.monotonic()
            if all_done is not None and time.monotonic() - all_done > exit_grace_s:
                warnings.warn(f"DDP workers finished but did not exit within {exit_grace_s:.0f} s; killed")
                return
            if time.monotonic() - t0 > deadline_s:
                raise TimeoutError(f"DDP workers still running after {deadline_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def _spawn_two(tmp_path, name, parallel="ddp", world=2, device="cpu", bf16_params=True):
    """Two gloo workers on this machine (or ``world`` workers on ``device``); skips only when the machine cannot
    connect them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = str(tmp_path / f"{name}.pt")
    try:
        _run_ddp_workers(world, port, str(tmp_path / name), result, parallel=parallel, device=device,
                         bf16_params=bf16_params)
    except Exception as e:
        met = all(os.path.exists(f"{result}.rendezvous{r}") for r in range(world))
        network = isinstance(e, TimeoutError) or any(
            m in str(e) for m in ("DistStoreError", "Timed out", "timed out", "Connection refused", "Gloo", "gloo"))
        if not met and network:
            # the one failure that is the machine's, not ours: two local processes could not reach each other
            pytest.skip(f"gloo could not rendezvous two processes on 127.0.0.1/lo here: {str(e)[-300:]}")
        raise
    return torch.load(result, weights_only=True)


def test_ddp_two_processes_equal_one_process_same_global_batch(tmp_path):
    ddp = _spawn_two(tmp_path, "ddp")
    single = _trainer(str(tmp_path / "one"), synthetic_table(10), 2, accum=2, micro=4)   # 1 x 2 x 4 = 2 x 1 x 4
    hist = single.fit()
    assert len(ddp["losses"]) == len(hist) == 2
    for a, b in zip(ddp["losses"], [h["loss"] for h in hist]):
        assert a == pytest.approx(b, rel=1e-5)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_fsdp_two_processes_equal_one_process_and_resume_across_modes(tmp_path):
    """FSDP2 (trainer.shard_model) on 2 CPU processes: sharded weights, killed after 2 of 3 steps and resumed by a
    fresh sharded trainer; losses, weights and EMA equal one process with the same global batch (2 ranks x 2
    micro-batches x 2 = 1 x 4 x 2). Its step-2 checkpoint (one format in every mode) resumes in one process to the
    same end."""
    import shutil
    fsdp = _spawn_two(tmp_path, "fsdp", parallel="fsdp")
    assert fsdp["local_numel"] < 0.6 * fsdp["numel"]          # rank 0 holds about half of every parameter
    single = _trainer(str(tmp_path / "one"), synthetic_table(10), 3, accum=4, micro=2, model=small_dit(depth=2))
    hist = single.fit()
    assert fsdp["losses"] == pytest.approx([h["loss"] for h in hist], rel=1e-5)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(fsdp["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert set(fsdp["ema"]) == set(single.ema.shadow)
    for k, v in single.ema.shadow.items():
        torch.testing.assert_close(fsdp["ema"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    os.makedirs(tmp_path / "cross" / "checkpoints")
    shutil.copy(tmp_path / "fsdp" / "checkpoints" / "step-0000002.pt", tmp_path / "cross" / "checkpoints")
    cross = _trainer(str(tmp_path / "cross"), synthetic_table(10), 3, accum=4, micro=2, model=small_dit(7, depth=2))
    assert [h["loss"] for h in cross.fit(resume=True)] == pytest.approx([h["loss"] for h in hist], rel=1e-5)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(cross.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


_GPU = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device,bf16_params", [("cpu", True), pytest.param("cuda", False, marks=_GPU),
                                                pytest.param("cuda", True, marks=_GPU)])
def test_fsdp_one_rank_group_trains_like_the_plain_loop(tmp_path, device, bf16_params):
    """The sharded path on one device (NCCL refuses two ranks on one GPU, so this is the one-GPU check of FSDP2's
    CUDA path: DTensor parameters and EMA on the GPU, bf16 autocast through the FSDP hooks, the sharded clip,
    checkpoint and rank-0 resume; with and without bf16 gathered weights): killed after 2 of 3 steps, resumed; ends
    where the plain loop does."""
    run1 = _spawn_two(tmp_path, "fsdp1", parallel="fsdp", world=1, device=device, bf16_params=bf16_params)
    single = _trainer(str(tmp_path / "one"), synthetic_table(10), 3, info=DistInfo(device=device), accum=2, micro=2,
                      model=small_dit(depth=2))
    hist = single.fit()
    # bf16 autocast on GPU; bf16 gathered weights also round the weights that autocast leaves in fp32 (norms, biases)
    tol = (dict(rtol=1e-5, atol=1e-6) if device == "cpu" else
           dict(rtol=2e-2, atol=5e-3) if bf16_params else dict(rtol=2e-2, atol=2e-3))
    assert run1["losses"] == pytest.approx([h["loss"] for h in hist], rel=tol["rtol"])
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(run1["state"][k].to(v.device), v, **tol, msg=k)
    for k, v in single.ema.shadow.items():
        torch.testing.assert_close(run1["ema"][k].to(v.device), v, **tol, msg=k)


def test_every_stage_runs_and_hands_off(tmp_path):
    """The smoke preset: vae -> features -> stage1 -> stage2 -> stage3 -> report, one folder per stage."""
    from test_data import SmallEncoders
    cfg = replace(TRAIN_PRESETS["smoke"], runs_dir=str(tmp_path), toy_train_clips=8, vae_steps=1, stage1_steps=1,
                  stage2_steps=2, stage3_steps=1, batch_size=4, toy_duration=0.8, sample_steps=1)
    outs = run(cfg, encoders=SmallEncoders())
    root = tmp_path / "smoke"
    for stage in ("vae", "stage1", "stage2", "stage3"):
        meta = json.load(open(root / stage / "meta.json"))
        assert meta["complete"] and meta["stage"] == stage
    assert json.load(open(root / "stage2" / "meta.json"))["init_from"] == str(root / "stage1")
    assert json.load(open(root / "stage3" / "meta.json"))["init_from"] == str(root / "stage2")
    assert json.load(open(root / "stage1" / "meta.json"))["task_counts"] == {"v2a": 0, "t2a": 1, "vt2a": 0}
    for d in ("dit", "dit_raw"):
        assert (root / "stage3" / d / "model.safetensors").is_file()
    assert (root / "features" / "train" / "index.json").is_file() and (root / "features" / "offscreen").is_dir()
    # a finished DiT stage folder is a pipeline: the generate CLI's --model takes it (the run's VAE by reference,
    # the latent normalisation the DiT was trained in)
    from omni2sound.pipeline import Omni2SoundPipeline
    from omni2sound.vae import AudioVAE
    pipe = Omni2SoundPipeline.from_pretrained(root / "stage3")
    stats = json.load(open(root / "stage3" / "latent_stats.json"))
    assert pipe.config.vae_dir == "../vae" and pipe.config.latent_mean == pytest.approx(stats["mean"])
    assert pipe.config.latent_std == pytest.approx(stats["std"])
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(),
                                                  AudioVAE.from_pretrained(root / "vae").state_dict().values()))
    rep = root / "report"
    scores = json.load(open(rep / "scores.json"))
    assert set(scores["results"]) == {"v2a", "t2a", "vt2a", "offscreen"}
    for f in ("report.md", "losses.png", "v2a_0.wav", "t2a_0.png", "vt2a_1.wav", "offscreen_0.png"):
        assert (rep / f).is_file(), f
    assert outs["report"] == str(rep)
    # resume skips the finished stages; --stage with a missing predecessor fails clearly
    assert run(cfg, resume=True, report=False, encoders=SmallEncoders())["stage3"] == str(root / "stage3")
    with pytest.raises(FileNotFoundError, match="run stage vae first"):
        run(replace(cfg, name="other"), stages=["stage3"], report=False, encoders=SmallEncoders())
    # the stage2-only schedule reuses the run's finished VAE (same latents for the comparison) and writes its DiT
    # beside the 1-2-3 stages, not over them
    vae_bytes = (root / "vae" / "model.safetensors").read_bytes()
    s2 = run(replace(cfg, schedule="stage2-only"), report=False, encoders=SmallEncoders())
    assert (root / "vae" / "model.safetensors").read_bytes() == vae_bytes
    assert s2["stage2"] == str(root / "stage2-only") and (root / "stage2-only" / "dit" / "model.safetensors").is_file()
    assert json.load(open(root / "stage2-only" / "meta.json"))["steps"] == 1 + 2 + 1     # the same compute
    os.remove(root / "stage2" / "meta.json")             # stage 2 unfinished: stage 3 alone must refuse
    with pytest.raises(FileNotFoundError, match="run stage2 first"):
        run(cfg, stages=["stage3"], report=False, encoders=SmallEncoders())


def test_training_from_raw_files(tmp_path):
    """Small data straight from a manifest of WAV files: vae on its audio, features extracted once, stage 1."""
    import soundfile as sf
    from test_data import SmallEncoders

    from omni2sound.data import write_manifest
    from omni2sound.toy import ToyConfig, ToyWorld
    world = ToyWorld(ToyConfig(duration=0.8))
    recs = []
    for i in range(6):
        c = world.clip(i)
        sf.write(tmp_path / f"{i}.wav", c.audio, 16000)
        recs.append({"clip_id": f"r{i}", "audio": f"{i}.wav", "duration": 0.8, "caption": c.caption})
    recs.append({"clip_id": "bad", "audio": "missing.wav", "duration": 0.8})
    write_manifest(str(tmp_path / "m.jsonl"), recs)
    cfg = replace(TRAIN_PRESETS["smoke"], runs_dir=str(tmp_path / "runs"), data=str(tmp_path / "m.jsonl"),
                  vae_steps=1, stage1_steps=2, batch_size=2)
    outs = run(cfg, stages=["vae", "stage1"], encoders=SmallEncoders())
    assert set(outs) == {"vae", "stage1"}                     # no toy report for real data
    meta = json.load(open(tmp_path / "runs" / "smoke" / "stage1" / "meta.json"))
    assert meta["complete"] and meta["steps"] == 2
    assert json.load(open(tmp_path / "runs" / "smoke" / "features" / "train" / "index.json"))["num_clips"] == 6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_loop_trains_like_the_plain_loop(tmp_path):
    # on a GPU: captured once (captions of different lengths are padded to one shape), replayed every step; the
    # tensor learning rate follows the schedule; losses and weights as the plain bf16 loop's
    table = synthetic_table(10)
    info = DistInfo(device="cuda")
    plain = _trainer(str(tmp_path / "a"), table, 5, info=info)
    graphed = _trainer(str(tmp_path / "b"), table, 5, info=info, cuda_graph=True)
    h_plain, h_graph = plain.fit(), graphed.fit()
    assert len(graphed.graphed.graphs) == 1
    assert [h["task"] for h in h_graph] == [h["task"] for h in h_plain]
    assert [h["loss"] for h in h_graph] == pytest.approx([h["loss"] for h in h_plain], rel=2e-2)
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in ("a", "b")]
    assert [r["lr"] for r in logs[1]] == pytest.approx([r["lr"] for r in logs[0]], rel=1e-5)
    for (k, a), b in zip(plain.model.state_dict().items(), graphed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3, msg=k)
    # killed after 2 steps and resumed in a fresh trainer: the loaded optimiser's lr goes back on the GPU as a
    # tensor, a new graph is captured, and the run ends where the uninterrupted one did
    part = _trainer(str(tmp_path / "c"), table, 5, info=info, cuda_graph=True)
    part.fit(stop_after=2)
    resumed = _trainer(str(tmp_path / "c"), table, 5, info=info, model=small_dit(seed=99), cuda_graph=True)
    h_res = resumed.fit(resume=True)
    assert all(torch.is_tensor(g["lr"]) and g["lr"].is_cuda for g in resumed.opt.param_groups)
    assert [h["loss"] for h in h_res] == pytest.approx([h["loss"] for h in h_graph], rel=1e-5)


def test_cli_set_parses_by_field_type():
    from omni2sound.train import parse_args
    cfg, _ = parse_args(["--set", "parallel=fsdp", "data=features", "name=123", "bf16=false", "lr=1e-4",
                         "task_probs=[0.5, 0.2, 0.3]", 'vae_config={"adv_weight": 0.1}'])
    assert (cfg.parallel, cfg.data, cfg.name, cfg.bf16, cfg.lr) == ("fsdp", "features", "123", False, 1e-4)
    assert cfg.task_probs == (0.5, 0.2, 0.3) and cfg.vae_config == {"adv_weight": 0.1}
    with pytest.raises(SystemExit, match="takes a JSON value"):
        parse_args(["--set", "lr=fast"])
    with pytest.raises(SystemExit, match="unknown TrainConfig field"):
        parse_args(["--set", "lrate=1"])


def test_guidance_reads_configs_that_name_it_cfg_scale(tmp_path):
    from omni2sound.schedule import TrainConfig
    from omni2sound.train import parse_args
    assert TrainConfig.from_dict({"cfg_scale": [2.0, 5.0]}).guidance == (2.0, 5.0)
    assert TrainConfig.from_dict({"cfg_scale": 4.0, "guidance": 4.0}).guidance == 4.0
    with pytest.raises(ValueError, match="cfg_scale"):
        TrainConfig.from_dict({"cfg_scale": 4.0, "guidance": 3.0})
    (tmp_path / "old.json").write_text('{"cfg_scale": [1.5, 2.5], "lr": 0.002}')
    cfg, _ = parse_args(["--config", str(tmp_path / "old.json")])
    assert cfg.guidance == (1.5, 2.5) and cfg.lr == 0.002
    assert parse_args(["--set", "cfg_scale=3"])[0].guidance == 3
    assert parse_args(["--set", "guidance=[2, 4]"])[0].guidance == (2, 4)


def test_cli_refuses_a_bad_config_or_init_folder(tmp_path, capsys):
    from omni2sound.train import parse_args
    (tmp_path / "c.json").write_text('{"lrr": 1}')
    for argv, why in ((["--config", str(tmp_path / "none.json")], "No such file"),
                      (["--config", str(tmp_path / "c.json")], "unknown TrainConfig fields"),
                      (["--init-from", str(tmp_path / "nope")], "no such folder")):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2 and why in capsys.readouterr().err
