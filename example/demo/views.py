from django.shortcuts import render

from demo.lrp import BOOT


def home(request):
    return render(request, "demo/home.html", {"primes": BOOT.get("primes", []), "boot": BOOT})
