"""mapgen.plan"""
