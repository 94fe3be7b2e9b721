"""Data: where samples come from and how they become tensors.

    dataset.py    VLDataset, the one in-memory format (images + prompt/response samples), and its files
    scenes.py     the embedded default data: generated shapes scenes with captions and questions
    readers.py    readers for public datasets on disk (COCO, Karpathy splits, Flickr8k/30k, VQAv2, DAQUAR)
    splits.py     which data a run uses: train / val / test / fine-tuning sets
    tokenizer.py  word-level tokenizer with [PAD] [MASK] [EOS] [UNK], text normalisation
    batching.py   samples -> fixed-size id tensors; the seeded, resumable batch order
"""
