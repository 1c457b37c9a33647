"""Weights on disk and their conversion, file by file (import the modules; nothing is re-exported here).

errors          CheckpointError (a file or folder cannot be read) and ConversionError (a tree does not
                fit the model; `.missing`, `.unexpected`, `.misshaped` keep every name)
tree            check_tree: the one check of a params tree against the model's abstract tree
safetensors_io  safetensors files through the library's numpy API (shapes before data; errors name the file)
checkpoint      a component folder's PyTorch weights: which files (variants, shards), a lazy StateDict,
                the one PyTorch-pickle reader (optional torch), config.json
convert         Rules and the leaf-kind layouts: a state dict planned against `jax.eval_shape(init)`
tables          every model family's Rules
orbax_io        params to and from orbax checkpoints
components      the architectures we build, and load_component: one loader for orbax or PyTorch weights
folder          pipeline folders: model_index.json, atomic writes and overwrite rules, save_pipeline,
                the Karlo prior's layouts
hub             a path or a hub repo id -> a local pipeline folder
export          params -> PyTorch-named safetensors and diffusers folders (the tables run backwards)
ldm             Stability's original (LDM) key layout: more Rules tables, built from the configs
single_file     sd21-unclip-h/-l and 512-depth-ema single files: kind from shapes, configs from a folder
"""
