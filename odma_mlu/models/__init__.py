"""Model implementations over odma-mlu's KV layout, and the Hugging Face folder loader."""
