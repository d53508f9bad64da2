"""Distillation from a teacher: collect its answers (teacher.py), then fine-tune on them (sft.py)."""
