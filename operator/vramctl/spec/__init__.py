"""What the user declares: the pydantic spec (the CRD is generated from it),
the engines (vLLM, SDXL, GPT-SoVITS: typed fields to args, env, health,
reservation), the pitfalls found in a spec, and the strict YAML loader."""
