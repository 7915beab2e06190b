"""Reading inputs and writing outputs safely: PEFT and Hugging Face folders, trainer layouts, atomic output folders."""
