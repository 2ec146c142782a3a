"""TRL's names and the Trainer's knobs: each alias and each passed-through field reaches the SFTConfig and LoraConfig
the run builds; wrong ones are one line."""

from __future__ import annotations

import pytest

from functionalnetworkssft.options import parse
from functionalnetworkssft.training.config import TRACKERS, TrainConfig
from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.training import lora_config, sft_config
from hostile import cli, one_line

REQUIRED = ["--model_name_or_path", "m", "--dataset_name_or_path", "d.jsonl", "--output_dir", "o"]


def config(*argv: str) -> TrainConfig:
    return parse(TrainConfig, list(argv), "fnsft train")


@pytest.mark.parametrize("alias, value, field, expected", [
    ("--dataset_name", "org/data", "dataset_name_or_path", ["org/data"]),
    ("--dataset_config", "en", "dataset_config_name", "en"),
    ("--max_length", "64", "max_seq_length", 64),
    ("--dtype", "bfloat16", "torch_dtype", "bfloat16"),
    ("--load_in_4bit", None, "use_4bit", True),
    ("--load_in_8bit", None, "use_8bit", True),
    ("--hub_model_id", "alice/x", "hub_repo_id", "alice/x"),
    ("--assistant_only_loss", "false", "train_on_prompt", True),
    ("--assistant_only_loss", None, "train_on_prompt", False),
    ("--completion_only_loss", "false", "train_on_prompt", True),
])
def test_trl_spellings_are_aliases(alias, value, field, expected):
    base = [a for a in REQUIRED if not (field == "dataset_name_or_path" and a in ("--dataset_name_or_path",
                                                                                     "d.jsonl"))]
    cfg = config(*base, alias, *([value] if value is not None else []))
    assert getattr(cfg, field) == expected


def test_yaml_accepts_the_aliases_and_suggests_the_right_flag(tmp_path, capsys):
    path = tmp_path / "trl.yaml"
    path.write_text("model_name_or_path: m\ndataset_name: d.jsonl\noutput_dir: o\nmax_length: 32\n"
                    "completion_only_loss: false\ndtype: float32\nhub_model_id: alice/y\n")
    cfg = config("--config", str(path))
    assert (cfg.dataset_name_or_path, cfg.max_seq_length, cfg.train_on_prompt, cfg.torch_dtype, cfg.hub_repo_id) == \
        (["d.jsonl"], 32, True, "float32", "alice/y")
    path.write_text("model_name_or_path: m\ndataset_nam: d.jsonl\noutput_dir: o\n")
    code, errors, _ = cli(capsys, "train", "--config", path)
    assert code == 2
    one_line(errors, "unknown key 'dataset_nam'; did you mean 'dataset_name'?")
    path.write_text("model_name_or_path: m\ndataset_name: d.jsonl\ndataset_name_or_path: e.jsonl\noutput_dir: o\n")
    code, errors, _ = cli(capsys, "train", "--config", path)
    assert code == 2
    one_line(errors, "keys 'dataset_name' and 'dataset_name_or_path' set the same value")


def test_two_spellings_of_one_flag_are_refused(capsys):
    code, errors, _ = cli(capsys, "train", *REQUIRED, "--max_length", "8", "--max_seq_length", "16")
    assert code == 2
    one_line(errors, "--max_length and --max_seq_length set the same value")


def test_help_shows_each_flag_once_with_its_alias():
    from functionalnetworkssft.options import build_parser

    text = build_parser(TrainConfig, "fnsft train").format_help()
    assert text.count("--max_seq_length | --max_length N") == 1
    assert text.count("--dataset_name_or_path | --dataset_name VALUE") == 1
    assert "--assistant_only_loss" in text  # named in --train_on_prompt's help, not as a second entry
    assert text.count("\n  --assistant_only_loss") == 0


def test_trainer_knobs_reach_the_sft_config():
    cfg = config(*REQUIRED, "--use_peft", "--lr_scheduler_type", "cosine", "--weight_decay", "0.1", "--optim",
                 "adafactor", "--max_grad_norm", "0.5", "--adam_beta1", "0.8", "--adam_beta2", "0.95",
                 "--per_device_eval_batch_size", "3", "--eval_strategy", "epoch", "--save_strategy", "epoch",
                 "--load_best_model_at_end", "--bf16", "--dataloader_num_workers", "2", "--neftune_noise_alpha", "5",
                 "--use_rslora", "--use_dora", "--lora_modules_to_save", "lm_head", "--attn_implementation", "eager")
    assert cfg.problems() == []
    args = sft_config(cfg, evaluating=True)
    assert (args.lr_scheduler_type, args.weight_decay, args.optim, args.max_grad_norm, args.adam_beta1,
            args.adam_beta2, args.per_device_eval_batch_size, args.eval_strategy, args.save_strategy,
            args.load_best_model_at_end, args.bf16, args.dataloader_num_workers, args.neftune_noise_alpha) == \
        ("cosine", 0.1, "adafactor", 0.5, 0.8, 0.95, 3, "epoch", "epoch", True, True, 2, 5.0)
    lora = lora_config(cfg)
    assert lora.use_rslora and lora.use_dora and lora.modules_to_save == ["lm_head"]


def test_any_sft_config_field_passes_through_from_the_trainer_mapping(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset_name_or_path: d.jsonl\noutput_dir: o\n"
                    "trainer:\n  adam_epsilon: 1.0e-6\n  torch_empty_cache_steps: 4\n  label_smoothing_factor: 0.1\n")
    cfg = config("--config", str(path))
    assert cfg.problems() == []
    args = sft_config(cfg, evaluating=False)
    assert (args.adam_epsilon, args.torch_empty_cache_steps, args.label_smoothing_factor) == (1e-6, 4, 0.1)
    assert cfg.to_yaml_dict()["trainer"] == {"adam_epsilon": 1e-6, "torch_empty_cache_steps": 4,
                                             "label_smoothing_factor": 0.1}
    path.write_text("model_name_or_path: m\ndataset_name_or_path: d.jsonl\noutput_dir: o\n"
                    "trainer:\n  adam_epsilom: 1.0e-6\n  learning_rate: 0.1\n")
    code, errors, _ = cli(capsys, "train", "--config", path)
    assert code == 2
    assert errors == ["fnsft train: error: trainer: unknown SFTConfig field 'adam_epsilom'; did you mean "
                      "'adam_epsilon'?",
                      "fnsft train: error: trainer: learning_rate is set by fnsft; use its flag (--learning_rate) or "
                      "leave it out."]
    path.write_text("model_name_or_path: m\ndataset_name_or_path: d.jsonl\noutput_dir: o\ntrainer: [1]\n")
    with pytest.raises(UsageError, match="key 'trainer' expects a mapping"):
        config("--config", str(path))


@pytest.mark.parametrize("flags, needle", [
    (["--optim", "adamw_torh"], "--optim adamw_torh: not an optimizer transformers knows; did you mean adamw_torch?"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 exclude each other"),
    (["--fp16"], "--fp16 needs a CUDA GPU"),
    (["--attn_implementation", "flash_attention_2"], "needs a CUDA GPU and the flash_attn package"),
    (["--load_best_model_at_end", "--save_strategy", "epoch"], "needs --save_strategy to match --eval_strategy"),
    (["--load_best_model_at_end", "--save_steps", "10", "--eval_steps", "4"], "to be a multiple of --eval_steps"),
    (["--load_best_model_at_end", "--validation_split", "0"], "--load_best_model_at_end needs evaluation"),
    (["--use_peft", "--use_dora", "--mask_mode", "lesion"], "--use_dora rescales every output row"),
    (["--report_to", "trackio"], "--report_to trackio needs the trackio package"),
    (["--report_to", "tensorbard"], "--report_to: unknown tracker(s) tensorbard"),
])
def test_knob_combinations_that_cannot_work_are_one_line(capsys, flags, needle):
    code, errors, _ = cli(capsys, "train", *REQUIRED, *flags)
    assert code == 2
    assert any(needle in line for line in errors), errors


def test_the_tracker_list_is_the_one_transformers_integrates():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(TRACKERS) == set(INTEGRATION_TO_CALLBACK)


def test_the_scheduler_choices_are_transformers_own():
    import typing

    from transformers.trainer_utils import SchedulerType

    choices = typing.get_args(TrainConfig.__dataclass_fields__["lr_scheduler_type"].type) if not isinstance(
        TrainConfig.__dataclass_fields__["lr_scheduler_type"].type, str) else None
    if choices is None:  # postponed annotations: read them from the parser
        from functionalnetworkssft.options import build_parser

        action = next(a for a in build_parser(TrainConfig, "x")._actions if a.dest == "lr_scheduler_type")
        choices = action.choices
    assert set(choices) == {s.value for s in SchedulerType}
