"""Request state, the scheduler, the model runner, sampling and LLMEngine."""
