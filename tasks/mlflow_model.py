"""The MLflow model of a loraflow export: a pyfunc that answers chat prompts with the merged model.

Logged as "model from code" by `tasks/tracking.py`: MLflow copies this file into the logged model
and the export's files as its `model` artifact, so `mlflow.pyfunc.load_model("models:/NAME@production")`
and `mlflow models serve` need transformers and torch, not loraflow. (MLflow's `transformers`
flavour cannot log a local checkpoint with transformers 5: its task table changed shape.)

`predict` takes a list of prompts (or a DataFrame with a `prompt` column; a prompt is a string or a
list of chat messages) and returns the greedy answers; `params={"max_new_tokens": N}` (default 64).
Never imported by loraflow itself.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class ChatModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["model"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.model.eval()

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        import torch

        if hasattr(model_input, "columns"):  # MLflow hands a list over as a one-column DataFrame
            model_input = model_input["prompt"] if "prompt" in model_input.columns else model_input.iloc[:, 0]
        prompts = list(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        answers = []
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                output = self.model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
            answers.append(self.tokenizer.decode(output[0, encoded["input_ids"].shape[-1]:], skip_special_tokens=True))
        return answers


mlflow.models.set_model(ChatModel())
