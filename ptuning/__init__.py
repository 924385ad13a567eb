"""P-Tuning v2 and full fine-tuning of ChatGLM-6B (run main.py or the *.sh scripts here)."""
