"""MLLM training tasks: LLaVA's two stages on conversation shards.

LLaVA-1.5 (arXiv:2310.03744) trains in two stages: (1) feature alignment, where only the projector learns
(vision tower and LLM frozen), then (2) visual instruction tuning, where projector and LLM learn (LLaVA also
offers LoRA for stage 2). Loss: next-token cross-entropy on the answer tokens only (prompt and image masked).

``mllm_stage1`` / ``mllm_stage2`` read shards whose ``json`` has ``question`` and ``answer`` (fashion-vqa, or
any conversation shard with those fields) and an image. ``stage2`` with ``lora_rank > 0`` injects LoRA adapters
(peft) into the LLM's attention projections; ``export`` merges them so the exported folder is a plain MLLM.
``evaluate`` reports the mean loss and the exact-match answer accuracy of greedy generation.

``token_drop`` > 0 trains for pruning: that share of training batches shows the LLM only a random subset of each
image's tokens (a fresh subset per sample, its size drawn uniformly from ``token_drop_keep``; kept tokens keep
their position ids, exactly as a pre-LLM pruner at inference leaves them), so the LLM learns to answer from
incomplete grids. Off by default; evaluation always sees every token.

``extra_turns`` > 0 makes each train sample a conversation: more questions about the same scene (from its json
``items``, other types than its own) as later turns, every answer learnt (:func:`~mmtok.mllm.text.encode_conversation`);
validation and test samples stay one question.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtok.data.transforms import key_seed
from mmtok.mllm.data import normalise_answer, questions_for
from mmtok.mllm.modeling import IGNORE_INDEX, MLLM
from mmtok.mllm.pruning.base import PruneContext, Pruner, PrunerConfig
from mmtok.registries import TASKS
from mmtok.train.task import Task

logger = logging.getLogger(__name__)


@dataclass
class MLLMTaskConfig:
    model: str = "llava_fashion_small"  # registered MLLM built from config (when init is empty)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # MLLMConfig fields for `model`
    init: str = ""  # start from an mmtok MLLM folder or an HF llava folder (e.g. the stage-1 export)
    stage: int = 1  # 1: projector only; 2: projector + LLM
    lora_rank: int = 0  # stage 2: 0 = full fine-tuning, > 0 = LoRA adapters of this rank
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    train_tower: bool = False  # also train the vision tower (tiny from-scratch models)
    eval_generate: bool = True  # answer accuracy by greedy generation in evaluate()
    max_new_tokens: int = 6
    token_drop: float = 0.0  # share of training batches that see a random subset of the image tokens (0 = off)
    token_drop_keep: list[int] = field(default_factory=lambda: [64, 576])  # [min, max] kept per image, uniform
    # train split: this many more questions about the same scene as later turns of one conversation (fashion-vqa
    # samples: asked from the json's items, other question types than the sample's own; 0 = one question)
    extra_turns: int = 0


class TokenDrop(Pruner):
    """Training-time token dropping: a fresh uniform random subset of ``K`` image tokens per sample.

    Uses the global torch generator, which training checkpoints save and restore, so a resumed run draws the
    same subsets. (The ``random`` pruner keeps one seeded subset for every image: an evaluation baseline.)
    """

    stage = "pre_llm"

    def select(self, ctx: PruneContext) -> torch.Tensor:
        feats = ctx.image_features
        k = self.budget(ctx.num_image_tokens)
        order = torch.rand(feats.shape[0], ctx.num_image_tokens).argsort(dim=1)
        return order[:, :k].sort(dim=1).values.to(feats.device)


def extra_turns(meta: dict[str, Any], key: str, n: int) -> list[tuple[str, str]]:
    """Up to ``n`` more (question, answer) turns about a fashion-vqa sample's scene, of other types than its own.

    Asked from the json's ``items`` by the builder's :func:`~mmtok.mllm.data.questions_for`, drawn from a generator
    seeded by the sample key (the same turns on every read). Samples without ``items`` get none.
    """
    items = meta.get("items")
    if not items or n <= 0:
        return []
    rng = np.random.default_rng(key_seed(key))
    qs = questions_for(items, rng)
    others = [t for t in sorted(qs) if t != meta.get("qtype")]
    order = rng.permutation(len(others))[:n]
    return [qs[others[int(i)]] for i in order]


def check_token_drop(config: MLLMTaskConfig) -> None:
    """Reject a ``token_drop`` / ``token_drop_keep`` pair that cannot work, with what to set instead."""
    p, keep = config.token_drop, list(config.token_drop_keep)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"task.token_drop is the share of training batches with dropped tokens, in [0, 1]; got {p}")
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in keep)
    if len(keep) != 2 or not ints or keep[0] > keep[1]:
        raise ValueError(
            f"task.token_drop_keep must be [min, max] image tokens kept per image, integers with 1 <= min <= max; "
            f"got {config.token_drop_keep}"
        )


class MLLMTask(Task):
    """Answer-only next-token loss of an :class:`MLLM` on (image, question, answer) samples."""

    def __init__(self, config: MLLMTaskConfig):
        super().__init__()
        from mmtok import registries

        self.config = config
        if config.init:
            self.model = MLLM.from_pretrained(config.init, **config.model_overrides)
        else:
            self.model = registries.get("mllm").create(config.model, **config.model_overrides)
        if self.model.tokenizer is None:
            raise ValueError(f"MLLM {config.model or config.init} has no tokenizer; set model_overrides.tokenizer")
        if config.stage not in (1, 2):
            raise ValueError(f"stage must be 1 (projector) or 2 (projector + LLM), not {config.stage}")
        check_token_drop(config)
        if config.extra_turns < 0:
            raise ValueError(f"task.extra_turns must be >= 0 (0 = one question per sample), got {config.extra_turns}")
        self.model.requires_grad_(False)
        self.model.projector.requires_grad_(True)
        self._lora = None
        if config.stage == 2:
            if config.lora_rank > 0:
                from peft import LoraConfig
                from peft.tuners.lora import LoraModel

                lcfg = LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_alpha,
                    target_modules=list(config.lora_targets),
                    lora_dropout=0.0,
                )
                # injected in place: self.model.llm keeps its class, the decoder loop is unchanged
                object.__setattr__(self, "_lora", LoraModel(self.model.llm, lcfg, "default"))
            else:
                self.model.llm.requires_grad_(True)
        if config.train_tower:
            self.model.tower.requires_grad_(True)
            _freeze_unused_tower_parameters(self.model)
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        logger.info("MLLM stage %d: %.2fM trainable parameters", config.stage, n_train / 1e6)

    # -- data -----------------------------------------------------------------------------------------------
    def sample_transform(self, split: str):
        from mmtok.mllm.text import encode_conversation

        tok = self.model.tokenizer

        def transform(sample: dict[str, Any]) -> dict[str, Any]:
            meta = sample["json"]
            if "question" not in meta or "answer" not in meta:
                raise ValueError(f"sample {sample.get('__key__')} has no question/answer in its json")
            turns = [(meta["question"], meta["answer"])]
            if split == "train" and self.config.extra_turns:
                turns += extra_turns(meta, str(sample.get("__key__", "")), self.config.extra_turns)
            ids, labels = encode_conversation(tok, turns)
            # the first question's prompt: labels = [-100] * prompt + its answer ids (+ later turns)
            prompt_len = next((i for i, v in enumerate(labels) if v != IGNORE_INDEX), len(labels))
            return {
                "image": sample["image"],
                "input_ids": ids,
                "labels": labels,
                "prompt_len": prompt_len,
                "answer": meta["answer"],
                "qtype": meta.get("qtype", ""),
            }

        return transform

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        pad = self.model.tokenizer.pad_token_id or 0
        ids, att, labels = _left_pad([s["input_ids"] for s in samples], pad, [s["labels"] for s in samples])
        prompts = [s["input_ids"][: s["prompt_len"]] for s in samples]
        p_ids, p_att, _ = _left_pad(prompts, pad)
        return {
            "images": torch.stack([s["image"] for s in samples]),
            "input_ids": ids,
            "attention_mask": att,
            "labels": labels,
            "prompt_ids": p_ids,
            "prompt_mask": p_att,
            "answers": [s["answer"] for s in samples],
            "qtypes": [s["qtype"] for s in samples],
        }

    # -- training -------------------------------------------------------------------------------------------
    def training_pruner(self) -> TokenDrop | None:
        """The token dropper for this training batch, or None (evaluation, ``token_drop`` 0, or not drawn)."""
        p = self.config.token_drop
        if not self.training or p <= 0.0 or float(torch.rand(())) >= p:
            return None
        n = self.model.num_image_tokens
        lo, hi = (min(v, n) for v in self.config.token_drop_keep)
        k = int(torch.randint(lo, hi + 1, ()))
        return None if k >= n else TokenDrop(PrunerConfig(num_keep=k))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # logits only where a label is predicted: the loss and the accuracy need no other row
        out = self.model(
            batch["input_ids"],
            batch["images"],
            batch["attention_mask"],
            labels=batch["labels"],
            loss_only=True,
            pruner=self.training_pruner(),
        )
        with torch.no_grad():
            hits = (out.label_logits.argmax(-1) == out.label_targets).sum().float()
            acc = hits / max(1, out.label_targets.numel())  # 0 without labels
        return {"loss": out.loss, "token_acc": acc}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        from mmtok.mllm.text import decode_answers

        sums: dict[str, float] = {}
        n_batches, correct, total = 0, 0, 0
        for batch in batches:
            for k, v in self(batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_batches += 1
            if self.config.eval_generate:
                gen = self.model.generate(
                    batch["prompt_ids"],
                    batch["images"],
                    batch["prompt_mask"],
                    max_new_tokens=self.config.max_new_tokens,
                    eos_token_id=self.model.tokenizer.eos_token_id,
                )
                answers = decode_answers(self.model.tokenizer, gen.sequences)
                correct += sum(normalise_answer(a) == normalise_answer(b) for a, b in zip(answers, batch["answers"]))
                total += len(answers)
        out = {k: v / max(n_batches, 1) for k, v in sums.items()}
        if total:
            out["answer_acc"] = correct / total
        return out

    def export(self, out_dir: str | Path) -> None:
        model = self.model
        if self._lora is not None:  # merge LoRA into a copy so the exported folder is a plain MLLM
            model, lora = copy.deepcopy((self.model, self._lora))  # one deepcopy keeps the two linked
            model.llm = lora.merge_and_unload()
        model.save_pretrained(out_dir)

    def synthetic_batch(self, batch_size: int) -> dict[str, Any]:
        """Random images and questions of the fashion-vqa form (benchmarks)."""
        from mmtok.mllm.text import encode_training_pair

        tok = self.model.tokenizer
        ids, labels = encode_training_pair(tok, "how many items are there ?", "two")
        samples = [
            {
                "image": torch.rand(3, 96, 96),
                "input_ids": ids,
                "labels": labels,
                "prompt_len": labels.count(IGNORE_INDEX),
                "answer": "two",
                "qtype": "count",
            }
        ] * batch_size
        return self.collate(samples)


def _freeze_unused_tower_parameters(model: MLLM) -> None:
    """Freeze tower parameters that cannot reach the LLM (blocks after the feature layer, a final norm, a
    classifier): they would get no gradient, which DistributedDataParallel refuses. Found by one tiny
    backward pass through ``encode_images`` rather than by name, so it holds for every tower family."""
    tower = model.tower
    params = [p for p in tower.parameters() if p.requires_grad]
    size = int(getattr(tower, "image_size", 32) or 32)
    was_training = tower.training
    tower.eval()  # no dropout; the graph is the same
    try:
        feats, _ = model.encode_images(torch.zeros(1, 3, size, size, device=model.device))
        grads = torch.autograd.grad(feats.sum(), params, allow_unused=True)
    finally:
        tower.train(was_training)
    unused = [p for p, g in zip(params, grads) if g is None]
    for p in unused:
        p.requires_grad_(False)
    if unused:
        logger.info("vision tower: %d parameter tensors never reach the LLM and stay frozen", len(unused))


def _left_pad(seqs: list[list[int]], pad: int, labels: list[list[int]] | None = None):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), length), dtype=torch.long)
    lab = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
    for i, s in enumerate(seqs):
        ids[i, length - len(s) :] = torch.tensor(s)
        att[i, length - len(s) :] = 1
        if lab is not None:
            lab[i, length - len(s) :] = torch.tensor(labels[i])
    return ids, att, lab


TASKS.add(
    "mllm_stage1",
    MLLMTask,
    config=MLLMTaskConfig,
    defaults={"stage": 1},
    help="LLaVA stage 1: train the projector only",
)
TASKS.add(
    "mllm_stage2",
    MLLMTask,
    config=MLLMTaskConfig,
    defaults={"stage": 2},
    help="LLaVA stage 2: projector + LLM (full or LoRA)",
)
