"""MedGemma on the device (llama.cpp through llama-cpp-python): settings, model, generation, prompting, KV prefix reuse, image encoders."""
