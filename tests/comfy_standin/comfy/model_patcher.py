"""Stand-in for comfy/model_patcher.py at Comfy-Org/ComfyUI
a125cd84b054a57729b5eecab930ca9408719832: the ``MODEL`` a node receives (``ModelPatcher``) and
``get_model_object`` (object patches first, else the model's attribute)."""


class ModelPatcher:
    def __init__(self, model, load_device="cpu"):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.object_patches = {}
        self.load_device = load_device

    # model_patcher.py, ModelPatcher.get_model_object
    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
