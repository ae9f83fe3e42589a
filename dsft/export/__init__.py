"""Export: streaming merge of adapters into the base checkpoint's layout, and its verification."""
