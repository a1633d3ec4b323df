__version__ = "0.0.1"

from nbtrain.args import TrainingArguments
from nbtrain.checkpoint import load_checkpoint
from nbtrain.launch import launch
from nbtrain.events import EarlyStoppingCallback, TrainerCallback, TrainerControl, TrainerState
from nbtrain.metrics import EvalPrediction
from nbtrain.trainer import PredictionOutput, TrainOutput, Trainer
from nbtrain.seq2seq import Seq2SeqTrainer, Seq2SeqTrainingArguments
from nbtrain.tracking import history_from

__all__ = ["Trainer", "TrainingArguments", "TrainerCallback", "TrainerControl", "TrainerState", "EarlyStoppingCallback",
           "EvalPrediction", "PredictionOutput", "TrainOutput", "load_checkpoint", "launch",
           "Seq2SeqTrainer", "Seq2SeqTrainingArguments", "history_from"]
