# W4A8 on COCO: the Out Sen Quant 4-bit plan with GPTQ rounding and every
# activation site at 8 bits (MSE ranges), each site's predicted damage
_base_ = './deformable_detr_r50_outquant_4bit_gptq.py'
custom_hooks = [
    dict(type='DistillSensitivityHook', metric='outquant', target_bits=4,
         bit_range=(3, 6), rounding='gptq',
         activations=dict(bits=8, method='mse', sensitivity=True))
]
