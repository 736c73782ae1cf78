"""Fine-tune a causal LM with ftcore through the transformers Trainer, on one process or many (DDP, FSDP2,
DeepSpeed ZeRO-3): the same script for every engine, launched with a config from examples/accelerate/.

    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/train.py --output-dir out/
    python examples/train.py --output-dir out/                        # one process

By default it builds a small Llama from a config with a fixed seed and trains on byte-level text from
ftcore's demo corpus, so it runs anywhere, offline. --model loads a Hugging Face checkpoint instead. The
adapter is saved into every checkpoint and into <output-dir>/ftcore_adapter by ftcore.SaveAdapterCallback;
sharded engines run the exact unmerged path (README, "Training on many GPUs")."""

import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import ftcore


def small_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


class ByteText(torch.utils.data.Dataset):
    """Fixed-length windows of a text's UTF-8 bytes (token id = byte value): no tokenizer to download."""

    def __init__(self, text: str, length: int):
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        self.windows = data[: len(data) // length * length].view(-1, length)

    def __len__(self):
        return self.windows.shape[0]

    def __getitem__(self, i):
        ids = self.windows[i]
        return {"input_ids": ids, "labels": ids}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--model", help="a Hugging Face causal LM (default: a small Llama from a config)")
    parser.add_argument("--method", choices=["sparse", "s2ft"], default="sparse")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2, help="per device")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.model:
        model = LlamaForCausalLM.from_pretrained(args.model) if "llama" in args.model.lower() else \
            __import__("transformers").AutoModelForCausalLM.from_pretrained(args.model)
    else:
        model = small_llama(args.seed)
    config = (ftcore.SparseDeltaConfig(density=0.02, seed=args.seed) if args.method == "sparse"
              else ftcore.StructuredSparseConfig(head_ratio=0.25, channel_ratio=0.1, seed=args.seed))
    model = ftcore.apply(model, config)

    corpus = os.path.join(os.path.dirname(ftcore.__file__), "data", "demo_corpus.txt")
    with open(corpus, encoding="utf-8") as f:
        dataset = ByteText(f.read(), 64)
    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, save_steps=args.save_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], seed=args.seed, data_seed=args.seed, save_only_model=True,
        dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, callbacks=[ftcore.SaveAdapterCallback()])
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        print(f"ftcore example: {training.world_size} processes, {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, adapter in "
              f"{os.path.join(args.output_dir, 'ftcore_adapter')}")


if __name__ == "__main__":
    main()
