__version__ = "0.0.1"

from nbtrain.args import TrainingArguments
from nbtrain.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint
from nbtrain.data import DataError
from nbtrain.launch import launch
from nbtrain.events import EarlyStoppingCallback, TrainerCallback, TrainerControl, TrainerState
from nbtrain.metrics import EvalPrediction, MetricError
from nbtrain.trainer import NonFiniteLossError, PredictionOutput, TrainOutput, Trainer
from nbtrain.seq2seq import Seq2SeqTrainer, Seq2SeqTrainingArguments
from nbtrain.sft import SFTConfig, SFTTrainer
from nbtrain.tracking import history_from

__all__ = ["Trainer", "TrainingArguments", "TrainerCallback", "TrainerControl", "TrainerState", "EarlyStoppingCallback",
           "EvalPrediction", "PredictionOutput", "TrainOutput", "load_checkpoint", "launch",
           "Seq2SeqTrainer", "Seq2SeqTrainingArguments", "SFTTrainer", "SFTConfig", "history_from",
           "DataError", "MetricError", "CheckpointError", "CheckpointWriteError", "NonFiniteLossError"]
