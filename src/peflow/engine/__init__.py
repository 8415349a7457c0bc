"""The video data engine (paper section 2.2): clips for the captioner (`clips`), the summarizer
backends (`summarize`) and caption quality (`metrics`). The stages are train-captioner, caption,
validate-captions and finetune-video (peflow.stages)."""
