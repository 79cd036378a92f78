# The design card's command, as written:
#   python tools/ptq.py configs/detr_r50_outquant_5bit.py
# DETR-R50 Out Sen Quant at 5 bits (the family folder's config).
_base_ = './detr/detr_r50_outquant_5bit.py'
